"""The header the client stores in front of every value.

It says how to rebuild the value (raw bytes, a numpy array or a torch tensor, with dtype and shape)
and carries the full user key, so a read through a hashed wire key that collided with another key is
detected instead of returning the other key's value. Layout, little-endian::

    magic b"GPUC" (4) | version u8 | kind u8 | dtype code u8 | ndim u8 | key_len u16 | flags u16
    | payload_len u64 | shape: ndim x u64 | full key: key_len bytes | zero pad to a multiple of 8

The pad keeps the payload 8-byte aligned after the header, so numpy and torch views are aligned.
"""

from __future__ import annotations

import enum
import math
import struct

import attrs

from nvmeof.errors import NvmeofError

MAGIC = b"GPUC"
VERSION = 1
MAX_NDIM = 64  # numpy 2's limit; torch's is lower
MAX_KEY_LENGTH = 0xFFFF
_U64_LIMIT = 1 << 64

_FIXED = struct.Struct("<4sBBBBHHQ")
FIXED_HEADER_LENGTH = _FIXED.size  # 20


class FramingError(NvmeofError, ValueError):
    """A value header is malformed, truncated, or describes an impossible value."""


class ValueKind(enum.IntEnum):
    BYTES = 0
    NUMPY = 1
    TORCH = 2


class HeaderFlag(enum.IntFlag):
    KEY_IS_STR = 0x0001  # the user key was a str (utf-8 in the key field), not bytes


@attrs.frozen
class DType:
    """One row of the wire dtype table."""

    name: str
    code: int
    itemsize: int


# Codes are wire values: append only, never renumber.
DTYPES: tuple[DType, ...] = (
    DType("bool", 1, 1),
    DType("int8", 2, 1),
    DType("int16", 3, 2),
    DType("int32", 4, 4),
    DType("int64", 5, 8),
    DType("uint8", 6, 1),
    DType("uint16", 7, 2),
    DType("uint32", 8, 4),
    DType("uint64", 9, 8),
    DType("float16", 10, 2),
    DType("bfloat16", 11, 2),
    DType("float32", 12, 4),
    DType("float64", 13, 8),
    DType("complex64", 14, 8),
    DType("complex128", 15, 16),
    DType("float8_e4m3fn", 16, 1),
    DType("float8_e5m2", 17, 1),
)
DTYPE_BY_NAME = {dtype.name: dtype for dtype in DTYPES}
DTYPE_BY_CODE = {dtype.code: dtype for dtype in DTYPES}


def header_length(key_len: int, ndim: int) -> int:
    """Bytes the header takes for a key of ``key_len`` bytes and ``ndim`` dimensions."""
    return (FIXED_HEADER_LENGTH + 8 * ndim + key_len + 7) & ~7


@attrs.frozen
class ValueLayout:
    """What a value is, apart from its bytes: the kind, dtype name and shape."""

    kind: ValueKind
    dtype: str
    shape: tuple[int, ...]


BYTES_LAYOUT = ValueLayout(ValueKind.BYTES, "uint8", ())


@attrs.frozen
class ValueHeader:
    """A decoded (or to-be-encoded) value header; constructing one validates it."""

    kind: ValueKind
    dtype: str
    shape: tuple[int, ...]
    key: bytes
    payload_len: int
    flags: int = 0

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.kind, ValueKind):
            object.__setattr__(self, "kind", _kind(self.kind))
        dtype = DTYPE_BY_NAME.get(self.dtype)
        if dtype is None:
            raise FramingError(f"unknown dtype {self.dtype!r}")
        if len(self.shape) > MAX_NDIM:
            raise FramingError(f"{len(self.shape)} dimensions exceed the maximum of {MAX_NDIM}")
        if any(not 0 <= dim < _U64_LIMIT for dim in self.shape):
            raise FramingError(f"shape {self.shape} has a dimension outside 0..2**64-1")
        if len(self.key) > MAX_KEY_LENGTH:
            raise FramingError(f"key of {len(self.key)} bytes exceeds {MAX_KEY_LENGTH}")
        if not 0 <= self.flags <= 0xFFFF:
            raise FramingError(f"flags 0x{self.flags:x} do not fit 16 bits")
        if not 0 <= self.payload_len < _U64_LIMIT:
            raise FramingError(f"payload length {self.payload_len} outside 0..2**64-1")
        if self.kind is ValueKind.BYTES:
            if self.shape or self.dtype != "uint8":
                raise FramingError("a bytes value has dtype uint8 and no shape")
        elif (expected := math.prod(self.shape) * dtype.itemsize) != self.payload_len:
            raise FramingError(
                f"payload of {self.payload_len} bytes does not match shape {self.shape}"
                f" of {self.dtype} ({expected} bytes)"
            )

    @classmethod
    def from_layout(
        cls, layout: ValueLayout, *, key: bytes, payload_len: int, flags: int = 0
    ) -> ValueHeader:
        return cls(layout.kind, layout.dtype, layout.shape, key, payload_len, flags)

    @property
    def layout(self) -> ValueLayout:
        return ValueLayout(self.kind, self.dtype, self.shape)

    @property
    def length(self) -> int:
        """Bytes this header takes when packed; the payload starts at this offset."""
        return header_length(len(self.key), len(self.shape))

    def pack(self) -> bytes:
        buf = bytearray(self.length)
        self.pack_into(buf)
        return bytes(buf)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        """Write the header at ``offset``; returns the offset past it (where the payload goes)."""
        end = offset + self.length
        if offset < 0 or end > len(buf):
            raise ValueError(f"header of {self.length} bytes does not fit at offset {offset}")
        code = DTYPE_BY_NAME[self.dtype].code
        _pack_fields(
            buf, offset, end, self.kind, code, self.shape, self.key, self.flags, self.payload_len
        )
        return end

    @staticmethod
    def peek_length(buf: bytes | bytearray | memoryview) -> int:
        """The full header length, from its first ``FIXED_HEADER_LENGTH`` bytes."""
        view = _byte_view(buf)
        _, _, ndim, key_len, _, _ = _unpack_fixed(view)
        return header_length(key_len, ndim)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> ValueHeader:
        """Decode the header at the start of ``buf`` (which may go on into the payload)."""
        view = _byte_view(buf)
        kind, dtype_code, ndim, key_len, flags, payload_len = _unpack_fixed(view)
        total = header_length(key_len, ndim)
        if len(view) < total:
            raise FramingError(f"header truncated: {len(view)} of {total} bytes")
        dtype = DTYPE_BY_CODE.get(dtype_code)
        if dtype is None:
            raise FramingError(f"unknown dtype code {dtype_code}")
        pos = FIXED_HEADER_LENGTH
        shape = struct.unpack_from(f"<{ndim}Q", view, pos)
        pos += 8 * ndim
        key = bytes(view[pos : pos + key_len])
        pos += key_len
        if any(view[pos:total]):
            raise FramingError("header padding is not zero")
        return cls(_kind(kind), dtype.name, shape, key, payload_len, flags)


def pack_header(layout: ValueLayout, key: bytes, payload_len: int) -> bytes:
    """``ValueHeader.from_layout(layout, key=key, payload_len=payload_len).pack()``, without
    building the record when the fields are plainly valid (every put, every get's expected
    header); anything else goes through ``ValueHeader``, which says what is wrong."""
    dtype = DTYPE_BY_NAME.get(layout.dtype)
    shape = layout.shape
    if (
        dtype is not None
        and len(key) <= MAX_KEY_LENGTH
        and 0 <= payload_len < _U64_LIMIT
        and (
            layout is BYTES_LAYOUT
            or (
                layout.kind is not ValueKind.BYTES
                and len(shape) <= MAX_NDIM
                and all(0 <= dim < _U64_LIMIT for dim in shape)
                and math.prod(shape) * dtype.itemsize == payload_len
            )
        )
    ):
        end = header_length(len(key), len(shape))
        buf = bytearray(end)
        _pack_fields(buf, 0, end, layout.kind, dtype.code, shape, key, 0, payload_len)
        return bytes(buf)
    return ValueHeader.from_layout(layout, key=key, payload_len=payload_len).pack()


def _pack_fields(
    buf: bytearray | memoryview,
    offset: int,
    end: int,
    kind: int,
    dtype_code: int,
    shape: tuple[int, ...],
    key: bytes,
    flags: int,
    payload_len: int,
) -> None:
    ndim = len(shape)
    _FIXED.pack_into(
        buf, offset, MAGIC, VERSION, kind, dtype_code, ndim, len(key), flags, payload_len
    )
    pos = offset + FIXED_HEADER_LENGTH
    if ndim:
        struct.pack_into(f"<{ndim}Q", buf, pos, *shape)
        pos += 8 * ndim
    buf[pos : pos + len(key)] = key
    pos += len(key)
    buf[pos:end] = bytes(end - pos)  # pad: at most 7 bytes


def _kind(value: int) -> ValueKind:
    try:
        return ValueKind(value)
    except ValueError:
        raise FramingError(f"unknown value kind {value}") from None


def _byte_view(buf: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _unpack_fixed(view: memoryview) -> tuple[int, int, int, int, int, int]:
    """kind, dtype code, ndim, key_len, flags, payload_len; checks magic and version."""
    if len(view) < FIXED_HEADER_LENGTH:
        raise FramingError(f"header truncated: {len(view)} of {FIXED_HEADER_LENGTH} bytes")
    magic, version, kind, dtype_code, ndim, key_len, flags, payload_len = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise FramingError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FramingError(f"unsupported header version {version}")
    if ndim > MAX_NDIM:
        raise FramingError(f"{ndim} dimensions exceed the maximum of {MAX_NDIM}")
    return kind, dtype_code, ndim, key_len, flags, payload_len
