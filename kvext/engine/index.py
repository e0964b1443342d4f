"""The flash engine's in-memory index (key -> record location) and its on-device checkpoint.

The checkpoint is written on clean shutdown and read at start, so a restart reads the index in one
sequential read instead of scanning every region. It stays valid while the engine runs: it records
each region's generation, and a region opened since then carries a newer one, so at start its
checkpointed entries are dropped and the region is scanned instead. Layout::

    header block: magic b"GKVC" | version u32 | entries u64 | next_seq u64 | regions u32
                  | body_len u64 | body crc u32 | header crc u32
    body:         regions x generation u64, then entries x (key_len u8 | key 16 | region u32
                  | offset u32 | record_len u32 | value_len u64 | seq u64 | pad 3)
"""

from __future__ import annotations

import struct

import attrs
import crc32c

from kvext.engine.record import ALIGN, align_up
from kvext.engine.region import CHECKPOINT_ENTRY_SIZE

CHECKPOINT_MAGIC = b"GKVC"
_HEAD = struct.Struct("<4sIQQIQI")
_ENTRY = struct.Struct("<B16sIIIQQ3x")
assert _ENTRY.size == CHECKPOINT_ENTRY_SIZE


@attrs.frozen(slots=True)
class Entry:
    """Where a key's newest record lives: region, byte offset in the region, lengths, sequence."""

    region: int
    offset: int
    record_len: int
    value_len: int
    seq: int


@attrs.frozen
class Checkpoint:
    next_seq: int
    generations: tuple[int, ...]  # per region, as of the checkpoint
    entries: dict[bytes, Entry]


def encode_checkpoint(checkpoint: Checkpoint, out: memoryview) -> int:
    """Write ``checkpoint`` into ``out`` (header block, then body); returns the bytes used."""
    regions = len(checkpoint.generations)
    body_len = regions * 8 + len(checkpoint.entries) * _ENTRY.size
    total = ALIGN + align_up(body_len)
    if total > len(out):
        raise ValueError(f"checkpoint of {total} bytes does not fit in {len(out)}")
    body = out[ALIGN : ALIGN + body_len]
    struct.pack_into(f"<{regions}Q", body, 0, *checkpoint.generations)
    pos = regions * 8
    for key, e in checkpoint.entries.items():
        _ENTRY.pack_into(
            body, pos, len(key), key, e.region, e.offset, e.record_len, e.value_len, e.seq
        )
        pos += _ENTRY.size
    head = _HEAD.pack(
        CHECKPOINT_MAGIC, 1, len(checkpoint.entries), checkpoint.next_seq, regions, body_len,
        crc32c.crc32c(body),
    )  # fmt: skip
    out[:ALIGN] = bytes(ALIGN)
    out[: _HEAD.size] = head
    struct.pack_into("<I", out, _HEAD.size, crc32c.crc32c(head))
    return total


def checkpoint_body_length(head: memoryview) -> int | None:
    """The body length a valid checkpoint header block announces, or None."""
    fields = _read_head(head)
    return None if fields is None else int(fields[5])


def _read_head(head: memoryview) -> tuple[bytes, int, int, int, int, int, int] | None:
    raw = bytes(head[: _HEAD.size + 4])
    fields = _HEAD.unpack_from(raw)
    (stored,) = struct.unpack_from("<I", raw, _HEAD.size)
    if (
        fields[0] != CHECKPOINT_MAGIC
        or fields[1] != 1
        or crc32c.crc32c(raw[: _HEAD.size]) != stored
    ):
        return None
    return fields


def decode_checkpoint(buf: memoryview, region_count: int) -> Checkpoint | None:
    """The checkpoint in ``buf`` (header block + body), or None if absent or damaged."""
    fields = _read_head(buf)
    if fields is None:
        return None
    _, _, count, next_seq, regions, body_len, body_crc = fields
    if regions != region_count or body_len != regions * 8 + count * _ENTRY.size:
        return None
    body = buf[ALIGN : ALIGN + body_len]
    if len(body) != body_len or crc32c.crc32c(body) != body_crc:
        return None
    generations = struct.unpack_from(f"<{regions}Q", body, 0)
    entries: dict[bytes, Entry] = {}
    for key_len, key, region, offset, record_len, value_len, seq in _ENTRY.iter_unpack(
        body[regions * 8 :]
    ):
        entries[bytes(key[:key_len])] = Entry(region, offset, record_len, value_len, seq)
    return Checkpoint(next_seq, tuple(generations), entries)
