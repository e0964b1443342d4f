"""Values as fragments: Reed-Solomon (k data + m parity, through pyeclib) or m+1 whole replicas.

Every fragment is self-describing: it carries enough to be checked and decoded with no other state
(the cluster map is not needed to read it). Layout, little-endian::

    FragmentHeader (48 bytes)
      magic b"GPEC" | version u8 | scheme u8 | backend u8 | k u8 | m u8 | index u8 | flags u16
      | generation u64 | value_len u64 | value_header_len u32 | payload_len u32
      | payload_crc u32 (CRC32C of value header + payload) | header_crc u32 (CRC32C of bytes 0..40)
      | 4 zero bytes
    value header (``kvext.framing.ValueHeader``: kind, dtype, shape, the full user key)
    payload: a pyeclib fragment (its own 80-byte header, then the coded bytes), or the whole value

The generation (the writer's ``time.time_ns()``) tells the fragments of one put from those of an
earlier or a half-finished one: a reader decodes only fragments of one generation, newest first.

Replication threshold. Values below ``DEFAULT_REPLICATE_BELOW`` (64 KiB) are stored as m+1 whole
copies instead of k+m fragments. The measurements behind it, on this repo's 2-core dev box
(pyeclib 1.8.0, 4+2; microseconds per call). The codec alone::

    size       isa_l encode  decode (data frags)  decode (2 lost)  liberasurecode_rs_vand encode
    1 KiB          1.6            1.6                 2.6                  7.9
    4 KiB          2.1            1.7                 2.9                 10.7
    16 KiB         5.0            4.3                 6.2                 29.8
    64 KiB        18.4            6.5                 7.4                119
    256 KiB       32.4           20.7                27.5                400
    1 MiB        113.9           59.9                84.7               2299
    4 MiB       1069             284                 887                6679
    32 MiB     49106           32482               35147               96613

and one put then one get (``out=``) through ``ClusterKV`` over six in-process loopback targets,
the same value coded (replicate_below=0) or replicated (replicate_below=inf)::

    size       coded put   get    replicated put   get
    4 KiB        2181     1919         1400        1195
    16 KiB       1737     1302         1421        1413
    64 KiB       3101     1580         2094        1854
    256 KiB      4439     1697         2830        4161
    1 MiB        9560     5130        15219       13189

The codec is never the cost for small values (microseconds against ~1 ms per cluster operation
here); the number of commands is: a coded put is k+m stores and a coded get k retrieves, a
replicated put m+1 stores and a replicated get one or two retrieves. Put+get crosses over between
64 KiB (coded 4.7 ms, replicated 3.9 ms) and 256 KiB (6.1 against 7.0 ms). At 64 KiB coding costs
~20% more time and half the space (1.5x against 3x), so coding starts there; below it values are
small enough that their 3x is cheap (a KV-cache block of one layer for 16 tokens is 64 KiB+ for
most models). The dev-box numbers are noisy (targets share the client's event loop and two cores).
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence

import attrs
import crc32c
from pyeclib.ec_iface import ECDriver, ECDriverError

from kvext.framing import FramingError, HeaderFlag, ValueHeader, ValueLayout
from kvext.keys import KeyLike, key_bytes
from nvmeof.errors import NvmeofError

MAGIC = b"GPEC"
VERSION = 1
DEFAULT_REPLICATE_BELOW = 64 * 1024

_FIXED = struct.Struct("<4sBBBBBBHQQIII")
_HEADER_CRC_SPAN = _FIXED.size  # header_crc covers everything before it
_CRC = struct.Struct("<I")
FRAGMENT_HEADER_LENGTH = 48
_PYECLIB_HEADER = 80  # liberasurecode's fragment header (fragment_header_t)
_PYECLIB_META = struct.Struct("<II")  # its first fields: index, size of the data in this fragment


class CodecError(NvmeofError, ValueError):
    """A fragment is malformed, fails its checksum, or a set of fragments cannot be decoded."""


class Scheme(enum.IntEnum):
    CODED = 1  # k data + m parity fragments (Reed-Solomon)
    REPLICA = 2  # m+1 whole copies


class Backend(enum.IntEnum):
    """pyeclib backends; both ship inside pyeclib's wheels (liberasurecode and ISA-L)."""

    ISA_L_RS_VAND = 1
    LIBERASURECODE_RS_VAND = 2

    @property
    def pyeclib_name(self) -> str:
        return self.name.lower()


def available_backends() -> list[Backend]:
    found = []
    for backend in Backend:
        try:
            ECDriver(k=2, m=1, ec_type=backend.pyeclib_name)
        except ECDriverError:
            continue
        found.append(backend)
    return found


def best_backend() -> Backend:
    """ISA-L where it loads, liberasurecode's own Reed-Solomon otherwise."""
    found = available_backends()
    if not found:
        raise CodecError("pyeclib has neither isa_l_rs_vand nor liberasurecode_rs_vand here")
    return found[0]


@attrs.frozen
class FragmentHeader:
    scheme: Scheme
    backend: Backend
    k: int
    m: int
    index: int
    generation: int
    value_len: int
    value_header_len: int
    payload_len: int
    payload_crc: int
    flags: int = 0

    def pack(self) -> bytes:
        buf = bytearray(FRAGMENT_HEADER_LENGTH)
        _FIXED.pack_into(
            buf,
            0,
            MAGIC,
            VERSION,
            self.scheme,
            self.backend,
            self.k,
            self.m,
            self.index,
            self.flags,
            self.generation,
            self.value_len,
            self.value_header_len,
            self.payload_len,
            self.payload_crc,
        )
        _CRC.pack_into(buf, _HEADER_CRC_SPAN, crc32c.crc32c(buf[:_HEADER_CRC_SPAN]))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> FragmentHeader:
        view = memoryview(buf)
        if len(view) < FRAGMENT_HEADER_LENGTH:
            raise CodecError(f"fragment of {len(view)} bytes is shorter than its header")
        fields = _FIXED.unpack_from(view)
        magic, version, scheme, backend, k, m, index, flags = fields[:8]
        generation, value_len, vh_len, payload_len, payload_crc = fields[8:]
        (header_crc,) = _CRC.unpack_from(view, _HEADER_CRC_SPAN)
        if magic != MAGIC:
            raise CodecError(f"bad fragment magic {bytes(magic)!r}")
        if header_crc != crc32c.crc32c(view[:_HEADER_CRC_SPAN]):
            raise CodecError("fragment header checksum mismatch")
        if any(view[_HEADER_CRC_SPAN + _CRC.size : FRAGMENT_HEADER_LENGTH]):
            raise CodecError("fragment header padding is not zero")
        if version != VERSION:
            raise CodecError(f"unsupported fragment version {version}")
        try:
            scheme_, backend_ = Scheme(scheme), Backend(backend)
        except ValueError as exc:
            raise CodecError(str(exc)) from None
        if k < 1 or m < 0 or index >= (k + m if scheme_ is Scheme.CODED else m + 1):
            raise CodecError(f"fragment index {index} impossible for k={k}, m={m}")
        return cls(
            scheme_, backend_, k, m, index, generation, value_len, vh_len, payload_len,
            payload_crc, flags,
        )  # fmt: skip

    @property
    def record_length(self) -> int:
        """Bytes of the whole stored fragment: this header, the value header, the payload."""
        return FRAGMENT_HEADER_LENGTH + self.value_header_len + self.payload_len


@attrs.frozen
class Fragment:
    """One stored fragment: its header, the value's header, and its payload (views, no copies)."""

    header: FragmentHeader
    value_header: ValueHeader
    payload: memoryview

    @property
    def index(self) -> int:
        return self.header.index

    def buffers(self) -> list[bytes | memoryview]:
        """What goes on the wire, in order (one ``sendmsg``, no concatenation)."""
        return [self.header.pack(), self.value_header.pack(), self.payload]

    @property
    def record_length(self) -> int:
        return self.header.record_length


def parse_fragment(
    buf: bytes | bytearray | memoryview, *, verify: bool = True, header_only: bool = False
) -> Fragment:
    """Decode a stored fragment; with ``verify`` its payload checksum is checked too.

    With ``header_only``, ``buf`` may end after the value header (a short read to survey what a
    target holds); the payload comes back empty and is not checked.
    """
    view = memoryview(buf).cast("B")
    header = FragmentHeader.unpack(view)
    vh_end = FRAGMENT_HEADER_LENGTH + header.value_header_len
    if len(view) < vh_end:
        raise CodecError(f"fragment truncated: {len(view)} bytes, header needs {vh_end}")
    try:
        value_header = ValueHeader.unpack(view[FRAGMENT_HEADER_LENGTH:vh_end])
    except FramingError as exc:
        raise CodecError(f"fragment value header: {exc}") from exc
    if value_header.length != header.value_header_len or value_header.payload_len != (
        header.value_len
    ):
        raise CodecError("fragment header and value header disagree")
    if header_only:
        return Fragment(header, value_header, view[0:0])
    if len(view) != header.record_length:
        raise CodecError(f"fragment is {len(view)} bytes, its header says {header.record_length}")
    payload = view[vh_end:]
    if verify and crc32c.crc32c(payload, crc32c.crc32c(view[FRAGMENT_HEADER_LENGTH:vh_end])) != (
        header.payload_crc
    ):
        raise CodecError(f"fragment {header.index} payload checksum mismatch")
    return Fragment(header, value_header, payload)


def _value_header(key: KeyLike, layout: ValueLayout, size: int) -> ValueHeader:
    flags = HeaderFlag.KEY_IS_STR if isinstance(key, str) else 0
    return ValueHeader.from_layout(layout, key=key_bytes(key), payload_len=size, flags=flags)


def user_key(value_header: ValueHeader) -> bytes | str:
    """The user's key as it was given (str or bytes), from a fragment's value header."""
    if value_header.flags & HeaderFlag.KEY_IS_STR:
        return value_header.key.decode("utf-8")
    return value_header.key


@attrs.define
class ErasureCode:
    """k+m Reed-Solomon through pyeclib, and the replicate-below-a-threshold rule."""

    k: int = 4
    m: int = 2
    backend: Backend = attrs.field(factory=best_backend)
    replicate_below: int = DEFAULT_REPLICATE_BELOW
    _drivers: dict[Backend, object] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.k < 1 or self.m < 0 or self.k + self.m > 32:
            raise ValueError(f"k={self.k}, m={self.m}: need k >= 1, m >= 0, k+m <= 32")

    @property
    def width(self) -> int:
        """Fragments of a coded value (k+m)."""
        return self.k + self.m

    def scheme_for(self, size: int) -> Scheme:
        return Scheme.REPLICA if size < self.replicate_below or self.m == 0 else Scheme.CODED

    def fragment_count(self, scheme: Scheme) -> int:
        return self.width if scheme is Scheme.CODED else self.m + 1

    def _driver(self, backend: Backend, k: int, m: int) -> object:
        if (backend, k, m) == (self.backend, self.k, self.m):
            driver = self._drivers.get(backend)
            if driver is None:
                driver = self._drivers[backend] = _make_driver(backend, k, m)
            return driver
        return _make_driver(backend, k, m)  # a fragment written with another k/m: decode alone

    def payload_length(self, size: int) -> int:
        """Payload bytes of each fragment of a value of ``size`` bytes (as this code stores it)."""
        if self.scheme_for(size) is Scheme.REPLICA:
            return size
        return _PYECLIB_HEADER + max(1, math.ceil(size / self.k))

    # --- encode -----------------------------------------------------------------------------
    def encode(
        self, key: KeyLike, layout: ValueLayout, data: memoryview, generation: int
    ) -> list[Fragment]:
        """The fragments of one value, index order (replicas share ``data``; no copy)."""
        size = len(data)
        scheme = self.scheme_for(size)
        value_header = _value_header(key, layout, size)
        packed_vh = value_header.pack()
        if scheme is Scheme.REPLICA:
            payloads: Sequence[bytes | memoryview] = [data] * (self.m + 1)
        else:
            payloads = self._driver(self.backend, self.k, self.m).encode(bytes(data))  # type: ignore[attr-defined]
        fragments = []
        for index, payload in enumerate(payloads):
            view = memoryview(payload)
            header = FragmentHeader(
                scheme=scheme,
                backend=self.backend,
                k=self.k,
                m=self.m,
                index=index,
                generation=generation,
                value_len=size,
                value_header_len=len(packed_vh),
                payload_len=len(view),
                payload_crc=crc32c.crc32c(view, crc32c.crc32c(packed_vh)),
            )
            fragments.append(Fragment(header, value_header, view))
        return fragments

    # --- decode -----------------------------------------------------------------------------
    def decode_into(self, fragments: Sequence[Fragment], dest: memoryview) -> None:
        """Rebuild the value of ``fragments`` (one generation; verified) into ``dest``."""
        first = fragments[0].header
        if len(dest) != first.value_len:
            raise ValueError(f"value is {first.value_len} bytes, destination {len(dest)}")
        if first.scheme is Scheme.REPLICA:
            dest[:] = fragments[0].payload
            return
        by_index = {f.index: f for f in fragments}
        if len(by_index) < first.k:
            raise CodecError(f"{len(by_index)} distinct fragments, {first.k} needed")
        if self._copy_data_fragments(by_index, first, dest):
            return
        driver = self._driver(first.backend, first.k, first.m)
        chosen = [bytes(by_index[i].payload) for i in sorted(by_index)[: first.k]]
        try:
            data = driver.decode(chosen)  # type: ignore[attr-defined]
        except ECDriverError as exc:
            raise CodecError(f"pyeclib decode: {exc}") from exc
        if len(data) != first.value_len:
            raise CodecError(f"decoded {len(data)} bytes, expected {first.value_len}")
        dest[:] = data

    def decode_bytes(self, fragments: Sequence[Fragment]) -> bytes:
        """The value of ``fragments`` as ``bytes`` (one copy: the data parts joined)."""
        first = fragments[0].header
        if first.scheme is Scheme.REPLICA:
            return bytes(fragments[0].payload)
        parts = self._data_parts({f.index: f for f in fragments}, first)
        if parts is not None:
            return b"".join(parts)
        buf = bytearray(first.value_len)
        self.decode_into(fragments, memoryview(buf))
        return bytes(buf)

    @staticmethod
    def _data_parts(
        by_index: dict[int, Fragment], first: FragmentHeader
    ) -> list[memoryview] | None:
        """Systematic RS: with fragments 0..k-1 at hand the value is their data, in order."""
        if any(i not in by_index for i in range(first.k)):
            return None
        parts = []
        pos = 0
        for i in range(first.k):
            payload = by_index[i].payload
            if len(payload) < _PYECLIB_HEADER:
                return None
            index, chunk = _PYECLIB_META.unpack_from(payload)
            if index != i or len(payload) != _PYECLIB_HEADER + chunk:
                return None  # not the layout this shortcut knows: let pyeclib decode
            take = max(0, min(chunk, first.value_len - pos))
            parts.append(payload[_PYECLIB_HEADER : _PYECLIB_HEADER + take])
            pos += take
        return parts if pos == first.value_len else None

    @classmethod
    def _copy_data_fragments(
        cls, by_index: dict[int, Fragment], first: FragmentHeader, dest: memoryview
    ) -> bool:
        parts = cls._data_parts(by_index, first)
        if parts is None:
            return False
        pos = 0
        for part in parts:
            dest[pos : pos + len(part)] = part
            pos += len(part)
        return True

    def reconstruct(self, fragments: Sequence[Fragment], missing: Sequence[int]) -> list[Fragment]:
        """Fragments ``missing`` (indices) rebuilt from at least k of the others."""
        first = fragments[0]
        h = first.header
        if h.scheme is Scheme.REPLICA:
            return [
                Fragment(attrs.evolve(h, index=i), first.value_header, first.payload)
                for i in missing
            ]
        driver = self._driver(h.backend, h.k, h.m)
        available = [bytes(f.payload) for f in fragments]
        try:
            rebuilt = driver.reconstruct(available, list(missing))  # type: ignore[attr-defined]
        except ECDriverError as exc:
            raise CodecError(f"pyeclib reconstruct: {exc}") from exc
        packed_vh = first.value_header.pack()
        out = []
        for index, payload in zip(missing, rebuilt, strict=True):
            view = memoryview(payload)
            header = attrs.evolve(
                h,
                index=index,
                payload_len=len(view),
                payload_crc=crc32c.crc32c(view, crc32c.crc32c(packed_vh)),
            )
            out.append(Fragment(header, first.value_header, view))
        return out


def _make_driver(backend: Backend, k: int, m: int) -> object:
    try:
        return ECDriver(k=k, m=m, ec_type=backend.pyeclib_name)
    except ECDriverError as exc:
        raise CodecError(
            f"pyeclib cannot load {backend.pyeclib_name} (k={k}, m={m}): {exc}"
        ) from exc
