"""The on-flash record: a value (or a Delete's tombstone) with the header that finds and checks it.

Layout, little-endian, starting on an ``ALIGN`` boundary of the device::

    magic b"GKVR" | version u8 | kind u8 | key_len u8 | flags u8 | meta_len u16 | reserved u16
    | value_len u64 | seq u64 | generation u64 | key 16 bytes (zero padded) | crc u32 | hcrc u32
    | pad to 64 | metadata (meta_len bytes, e.g. dtype/shape) | pad to 8 | value | pad to ALIGN

``crc`` is CRC32C over the header (with ``crc`` and ``hcrc`` zero), the metadata and the value;
``hcrc`` covers the header alone, so a scan can trust ``value_len`` and skip a record whose body is
torn instead of losing the rest of its region. Both CRCs are seeded with the device's random nonce,
so a stored value that happens to contain a record image (say, a copy of another device) is never
mistaken for a record. ``generation`` is the region's generation when the record was written: a
recycled region still holds older records past its new write pointer, and those are ignored.
``seq`` orders every write of the device, so the newest record (or tombstone) of a key wins.
"""

from __future__ import annotations

import enum
import struct

import attrs
import crc32c

ALIGN = 4096  # the unit of O_DIRECT I/O and of record placement
MAGIC = b"GKVR"
VERSION = 1
MAX_KEY_LENGTH = 16

_HEADER = struct.Struct("<4sBBBBHHQQQ16sII4x")
HEADER_SIZE = _HEADER.size  # 64
_CRC_AT = HEADER_SIZE - 12  # offset of the crc field
_HCRC_AT = HEADER_SIZE - 8


class RecordKind(enum.IntEnum):
    VALUE = 1
    TOMBSTONE = 2


def align_up(n: int, unit: int = ALIGN) -> int:
    return -(-n // unit) * unit


def value_offset(meta_len: int) -> int:
    """Where the value starts inside its record."""
    return HEADER_SIZE + align_up(meta_len, 8)


def record_length(value_len: int, meta_len: int = 0) -> int:
    """The bytes a record occupies on the device (whole ``ALIGN`` units)."""
    return align_up(value_offset(meta_len) + value_len)


def nonce_seed(nonce: int) -> int:
    return crc32c.crc32c(nonce.to_bytes(8, "little"))


@attrs.frozen
class RecordHeader:
    kind: RecordKind
    key: bytes
    value_len: int
    seq: int
    generation: int
    meta_len: int = 0
    flags: int = 0

    @property
    def value_offset(self) -> int:
        return value_offset(self.meta_len)

    @property
    def record_length(self) -> int:
        return record_length(self.value_len, self.meta_len)

    def pack_into(self, buf: memoryview) -> None:
        """Write the header with both CRCs zero; ``seal`` fills them in once the body is there."""
        _HEADER.pack_into(
            buf, 0, MAGIC, VERSION, self.kind, len(self.key), self.flags, self.meta_len, 0,
            self.value_len, self.seq, self.generation, self.key, 0, 0,
        )  # fmt: skip


def seal(buf: memoryview, seed: int) -> None:
    """Compute and store both CRCs of the record whose header ``pack_into`` wrote at ``buf[0]``.

    Runs in a worker thread for large values: CRC32C of 80 MiB takes milliseconds.
    """
    header = unpack_header(buf)
    assert header is not None
    end = header.value_offset + header.value_len
    meta = buf[HEADER_SIZE : HEADER_SIZE + header.meta_len]
    crc = crc32c.crc32c(buf[header.value_offset : end], crc32c.crc32c(meta, _header_crc(buf, seed)))
    struct.pack_into("<I", buf, _CRC_AT, crc)
    struct.pack_into("<I", buf, _HCRC_AT, crc32c.crc32c(buf[:_HCRC_AT], seed))


def _header_crc(buf: memoryview, seed: int) -> int:
    # The header with both CRC fields read as zero.
    return crc32c.crc32c(bytes(12), crc32c.crc32c(buf[:_CRC_AT], seed))


def unpack_header(buf: memoryview) -> RecordHeader | None:
    """The header at ``buf[0]`` if it is shaped like one (magic, version, sane lengths), else None.

    Says nothing about the CRCs; see ``header_intact`` and ``body_intact``.
    """
    if len(buf) < HEADER_SIZE:
        return None
    (magic, version, kind, key_len, flags, meta_len, _, value_len, seq, generation, key, _, _) = (
        _HEADER.unpack_from(buf, 0)
    )
    if magic != MAGIC or version != VERSION or kind not in (1, 2):
        return None
    if not 1 <= key_len <= MAX_KEY_LENGTH:
        return None
    return RecordHeader(
        kind=RecordKind(kind),
        key=bytes(key[:key_len]),
        value_len=value_len,
        seq=seq,
        generation=generation,
        meta_len=meta_len,
        flags=flags,
    )


def header_intact(buf: memoryview, seed: int) -> bool:
    (stored,) = struct.unpack_from("<I", buf, _HCRC_AT)
    return bool(crc32c.crc32c(buf[:_HCRC_AT], seed) == stored)


def body_intact(buf: memoryview, header: RecordHeader, seed: int) -> bool:
    """``buf`` holds the whole record: does its CRC over header, metadata and value match?"""
    end = header.value_offset + header.value_len
    if len(buf) < end:
        return False
    (stored,) = struct.unpack_from("<I", buf, _CRC_AT)
    meta = buf[HEADER_SIZE : HEADER_SIZE + header.meta_len]
    crc = crc32c.crc32c(buf[header.value_offset : end], crc32c.crc32c(meta, _header_crc(buf, seed)))
    return bool(crc == stored)
