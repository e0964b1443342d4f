"""Device geometry: the superblock, the regions and their headers, and the per-region write gate.

Device layout (every offset a multiple of ``ALIGN``)::

    superblock (ALIGN) | checkpoint area | region 0 | region 1 | ... | region N-1 | (unused tail)

A region starts with a header block (magic, index, generation, CRC), then records back to back. A
region is written only while it is the open region; when it is full the engine seals it and opens
another, and when none is free it recycles the oldest sealed one (FIFO: that is what keeps an older
record from outliving the newer record or tombstone that replaced it). Opening gives the region a
new generation (a number from the device's sequence), which every record written into it carries.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Callable

import attrs
import crc32c

from kvext.engine.record import ALIGN, align_up, record_length

SUPERBLOCK_MAGIC = b"GPUCACHE-FLASHKV"
SUPERBLOCK_VERSION = 1
REGION_MAGIC = b"GKVG"
REGION_HEADER_SIZE = ALIGN  # the region's first block; records start after it
CHECKPOINT_ENTRY_SIZE = 48  # see kvext.engine.index
MIN_REGIONS = 2  # one open, one sealed that can be recycled
DEFAULT_REGION_SIZE = 16 << 20

_SUPER = struct.Struct("<16sIIQIIQQQQQ")
_REGION = struct.Struct("<4sIQI")


class FormatError(Exception):
    """The device holds no GPUCache flash format (or a damaged or incompatible one)."""


@attrs.frozen
class Superblock:
    region_size: int
    region_count: int
    data_offset: int
    checkpoint_offset: int
    checkpoint_size: int
    nonce: int
    device_size: int

    def pack(self) -> bytes:
        body = _SUPER.pack(
            SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION, ALIGN, self.region_size, self.region_count, 0,
            self.data_offset, self.checkpoint_offset, self.checkpoint_size, self.nonce,
            self.device_size,
        )  # fmt: skip
        return body + struct.pack("<I", crc32c.crc32c(body))

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Superblock:
        """The superblock in ``buf``; ``FormatError`` saying what is wrong otherwise."""
        head = bytes(buf[: _SUPER.size + 4])
        if not any(head):
            raise FormatError("the device is blank (no GPUCache flash format)")
        fields = _SUPER.unpack_from(head)
        if fields[0] != SUPERBLOCK_MAGIC:
            raise FormatError("the device holds something else (no GPUCache flash superblock)")
        (stored,) = struct.unpack_from("<I", head, _SUPER.size)
        if crc32c.crc32c(head[: _SUPER.size]) != stored:
            raise FormatError("the GPUCache flash superblock is damaged (CRC mismatch)")
        if fields[1] != SUPERBLOCK_VERSION or fields[2] != ALIGN:
            raise FormatError(f"unsupported GPUCache flash format version {fields[1]}")
        _, _, _, region_size, region_count, _, data_offset, ckpt_off, ckpt_size, nonce, dev = fields
        return cls(region_size, region_count, data_offset, ckpt_off, ckpt_size, nonce, dev)

    def region_offset(self, index: int) -> int:
        return self.data_offset + index * self.region_size


def region_size_for(max_value_length: int) -> int:
    """The default region size: 16 MiB, or enough for the largest record rounded up to 1 MiB."""
    return max(
        DEFAULT_REGION_SIZE, align_up(REGION_HEADER_SIZE + record_length(max_value_length), 1 << 20)
    )


def checkpoint_size(region_count: int, region_size: int) -> int:
    # Room for a record in every ALIGN unit of every region: the most entries there can be.
    max_entries = region_count * (region_size - REGION_HEADER_SIZE) // ALIGN
    return ALIGN + align_up(region_count * 8) + align_up(max_entries * CHECKPOINT_ENTRY_SIZE)


def plan_geometry(device_size: int, region_size: int, nonce: int) -> Superblock:
    """Fit as many regions as the device holds after the superblock and checkpoint area."""
    if region_size % ALIGN or region_size < REGION_HEADER_SIZE + ALIGN:
        raise ValueError(f"region size {region_size} must be a multiple of {ALIGN}, >= {2 * ALIGN}")
    count = max(0, (device_size - ALIGN) // region_size)
    while count >= MIN_REGIONS:
        ckpt = checkpoint_size(count, region_size)
        if ALIGN + ckpt + count * region_size <= device_size:
            return Superblock(region_size, count, ALIGN + ckpt, ALIGN, ckpt, nonce, device_size)
        count -= 1
    need = ALIGN + checkpoint_size(MIN_REGIONS, region_size) + MIN_REGIONS * region_size
    raise FormatError(
        f"device of {device_size} bytes is too small: {MIN_REGIONS} regions of {region_size}"
        f" bytes plus metadata need {need}"
    )


def pack_region_header(index: int, generation: int, nonce: int) -> bytes:
    body = _REGION.pack(REGION_MAGIC, index, generation, 0)[:-4]
    return body + struct.pack("<I", crc32c.crc32c(body, crc32c.crc32c(nonce.to_bytes(8, "little"))))


def unpack_region_header(buf: bytes | memoryview, index: int, nonce: int) -> int | None:
    """The generation in a region's header block, or None if the region was never opened."""
    head = bytes(buf[: _REGION.size])
    magic, stored_index, generation, stored = _REGION.unpack(head)
    if magic != REGION_MAGIC or stored_index != index:
        return None
    crc = crc32c.crc32c(head[:-4], crc32c.crc32c(nonce.to_bytes(8, "little")))
    return int(generation) if crc == stored else None


class RegionState(enum.Enum):
    FREE = "free"
    OPEN = "open"
    SEALED = "sealed"


class WriteGate:
    """Orders a region's writes across generations; used from worker threads.

    A write of generation g must not start while writes of an older generation of the same region
    are still running (a slow write could land on top of the recycled region's new records), and
    the region's header for g must be on the device before any record of g (a record in a region
    whose header says another generation is ignored on restart, so it would be lost although its
    Store was acknowledged). ``begin`` is called on the event loop when the space is reserved, so
    the gate knows of a write before any later generation's writer can look.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}
        self._header_generation = -1

    def begin(self, generation: int) -> None:
        with self._cond:
            self._pending[generation] = self._pending.get(generation, 0) + 1

    def enter(self, generation: int, write_header: Callable[[], None]) -> None:
        """Wait for older generations' writes, then write this generation's header once."""
        with self._cond:
            self._cond.wait_for(lambda: all(g >= generation for g in self._pending))
            if self._header_generation != generation:
                write_header()
                self._header_generation = generation

    def end(self, generation: int) -> None:
        with self._cond:
            left = self._pending[generation] - 1
            if left:
                self._pending[generation] = left
            else:
                del self._pending[generation]
            self._cond.notify_all()

    def header_written(self, generation: int) -> bool:
        with self._cond:
            return self._header_generation == generation

    def mark_header(self, generation: int) -> None:
        with self._cond:
            self._header_generation = generation


@attrs.define(eq=False)
class Region:
    """One region's in-memory state: where the next record goes, and which keys live here."""

    index: int
    state: RegionState = RegionState.FREE
    generation: int = 0
    write_offset: int = REGION_HEADER_SIZE
    live_bytes: int = 0
    keys: set[bytes] = attrs.Factory(set)
    gate: WriteGate = attrs.Factory(WriteGate)
