"""A key-value engine on a file or raw block device, laid out as flash caches lay it out.

The layout follows CacheLib's BlockCache and LMCache's raw_block backend.

The device is split into regions (``kvext.engine.region``); values are appended to the open region
as records (``kvext.engine.record``) and found through an in-memory index (``kvext.engine.index``).
When no region is free the oldest sealed region is recycled whole and its keys are evicted (FIFO;
``TieredEngine`` reinserts the ones its DRAM tier still holds, which is where the hot ones are).

Concurrency: the index, the region bookkeeping and every decision live on the event loop thread and
are never awaited halfway; only device I/O and CRCs run in worker threads, through ``offload``. A
Store reserves its space (and a sequence number) before it awaits the write, and commits to the
index after the write returns, so the index never points at bytes not yet written; if a newer Store
or Delete of the same key was issued meanwhile, the older one does not commit. A Retrieve checks the
record it read (CRC, key, sequence) and so tells a region recycled under it (a miss) from corruption
(dropped and counted).

What an acknowledged Store guarantees: its record was written to the device (``pwrite`` returned;
with O_DIRECT, handed to the device) and its region's header before it. So it survives a crash of
the process (SIGKILL) and is served after restart unless evicted. It is durable against power loss
once ``flush()`` (the NVMe Flush command) returns: that is an ``fdatasync``, which also flushes the
drive's write cache. A Delete writes a tombstone before it is acknowledged, with the same
guarantees.
A clean ``close()`` writes the index checkpoint; after a crash the start-up scan rebuilds the index
from the checkpoint plus the regions opened since, or from all regions.
"""

from __future__ import annotations

import bisect
import logging
import secrets
import weakref
from collections import deque
from collections.abc import Callable

import attrs

from kvext.engine.base import (
    EngineLimits,
    EngineStats,
    InvalidKey,
    KeyMissing,
    Offload,
    Unrecovered,
    ValueTooLarge,
    check_store,
    run_inline,
)
from kvext.engine.device import AlignedBufferPool, BlockDevice, IOMode, aligned_buffer
from kvext.engine.index import (
    Checkpoint,
    Entry,
    checkpoint_body_length,
    decode_checkpoint,
    encode_checkpoint,
)
from kvext.engine.record import (
    ALIGN,
    HEADER_SIZE,
    MAX_KEY_LENGTH,
    RecordHeader,
    RecordKind,
    align_up,
    body_intact,
    header_intact,
    nonce_seed,
    record_length,
    seal,
    unpack_header,
)
from kvext.engine.region import (
    REGION_HEADER_SIZE,
    FormatError,
    Region,
    RegionState,
    Superblock,
    pack_region_header,
    plan_geometry,
    region_size_for,
    unpack_region_header,
)
from nvmeof.errors import NvmeofError

log = logging.getLogger("kvext.engine.flash")


class FlashOpenError(NvmeofError):
    """The device cannot be used: missing, unreadable, too small, or holding another format."""


@attrs.define
class FlashStats(EngineStats):
    """``EngineStats`` plus the device's own counters. ``evicted_bytes`` counts record bytes."""

    regions_evicted: int = 0
    bytes_written: int = 0  # device bytes, records and headers
    bytes_read: int = 0
    crc_dropped: int = 0  # records whose CRC failed, at start-up scan or on read
    stale_reads: int = 0  # a read raced with its region being recycled: answered as a miss
    superseded: int = 0  # a Store that finished after a newer Store/Delete of the same key
    tombstones: int = 0
    flushes: int = 0
    recovered_keys: int = 0
    recovery_scanned_regions: int = 0
    recovered_from_checkpoint: bool = False


class FlashEngine:
    """A ``KeyValueEngine`` on a device; open it with ``FlashEngine.open``."""

    def __init__(
        self,
        device: BlockDevice,
        superblock: Superblock,
        limits: EngineLimits,
        *,
        offload: Offload = run_inline,
    ) -> None:
        self.device = device
        self.superblock = superblock
        self._limits = limits
        self._offload = offload
        self._seed = nonce_seed(superblock.nonce)
        self._stats = FlashStats()
        self._regions = [Region(i) for i in range(superblock.region_count)]
        self._sealed: deque[Region] = deque()  # oldest first: the FIFO eviction order
        self._open: Region | None = None
        self._index: dict[bytes, Entry] = {}
        self._sorted: list[bytes] | None = None
        self._used = 0
        self._next_seq = 1
        # Key -> the sequence number of the newest Store/Delete issued and not yet finished.
        self._latest: dict[bytes, int] = {}
        self._lent: weakref.WeakValueDictionary[int, memoryview] = weakref.WeakValueDictionary()
        self._buffers = AlignedBufferPool()
        self.on_evict: Callable[[bytes], None] | None = None  # called per key a region takes along
        self.bad_records: list[tuple[int, int]] = []  # (region, offset) the start-up scan dropped

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str,
        *,
        max_value_length: int,
        size: int | None = None,
        region_size: int | None = None,
        format: bool = False,
        direct: bool | None = None,
        offload: Offload = run_inline,
    ) -> FlashEngine:
        """Open (and if blank, format) the device at ``path`` and rebuild the index.

        ``size`` creates or grows a regular file. A device holding anything but a usable GPUCache
        flash format is refused unless ``format`` is True; a valid one is never reformatted.
        """
        try:
            device = BlockDevice.open(path, create_size=size, direct=direct)
        except OSError as exc:
            raise FlashOpenError(f"cannot open flash device {path}: {exc.strerror or exc}") from exc
        try:
            superblock = cls._superblock(device, max_value_length, region_size, format=format)
            usable = superblock.region_size - REGION_HEADER_SIZE
            limits = EngineLimits(
                max_value_length=max_value_length,
                capacity_bytes=superblock.region_count * usable,
                max_key_length=MAX_KEY_LENGTH,
            )
            engine = cls(device, superblock, limits, offload=offload)
            engine._recover()
        except FormatError as exc:
            device.close()
            raise FlashOpenError(f"{path}: {exc}") from None
        except OSError as exc:
            device.close()
            raise FlashOpenError(f"cannot read flash device {path}: {exc.strerror or exc}") from exc
        except BaseException:
            device.close()
            raise
        return engine

    @staticmethod
    def _superblock(
        device: BlockDevice, max_value_length: int, region_size: int | None, *, format: bool
    ) -> Superblock:
        block = aligned_buffer(ALIGN)
        device.read_into(block, 0)
        wanted = region_size or region_size_for(max_value_length)
        try:
            superblock = Superblock.unpack(block)
        except FormatError as exc:
            blank = not any(block)
            if not blank and not format:
                raise FlashOpenError(
                    f"{device.path}: {exc}; refusing to overwrite it"
                    " (format=True / --flash-format allows formatting it)"
                ) from None
            return _format(device, wanted)
        if superblock.device_size > device.size:
            raise FlashOpenError(
                f"{device.path}: formatted for {superblock.device_size} bytes but only"
                f" {device.size} are there (truncated?)"
            )
        if record_length(max_value_length) > superblock.region_size - REGION_HEADER_SIZE:
            raise FlashOpenError(
                f"{device.path}: its regions of {superblock.region_size} bytes cannot hold values"
                f" of {max_value_length} bytes; lower the maximum value size or reformat it"
            )
        return superblock

    # --- the KeyValueEngine protocol --------------------------------------------------------
    @property
    def limits(self) -> EngineLimits:
        return self._limits

    @property
    def stats(self) -> FlashStats:
        return self._stats

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def io_mode(self) -> IOMode:
        return self.device.mode

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def exists(self, key: bytes) -> bool:
        return key in self._index

    def seq_of(self, key: bytes) -> int | None:
        """The sequence number of the record the index holds for ``key``."""
        entry = self._index.get(key)
        return None if entry is None else entry.seq

    def pending(self, key: bytes) -> bool:
        """A Store or Delete of ``key`` is in flight."""
        return key in self._latest

    def allocate(self, size: int) -> memoryview:
        """A view into an aligned record buffer, after room for the header: no copy at Store."""
        self._check_size(size)
        base = self._buffers.take(record_length(size))
        # The value overwrites its part; clear the padding after it (it goes to the device).
        tail = base[HEADER_SIZE + size :]
        tail[:] = bytes(len(tail))
        view = base[HEADER_SIZE : HEADER_SIZE + size]
        self._lent[id(view)] = view
        return view

    def list_keys(self, start: bytes = b"", limit: int | None = None) -> list[bytes]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        if self._sorted is None:
            self._sorted = sorted(self._index)
        first = bisect.bisect_left(self._sorted, start)
        end = len(self._sorted) if limit is None else first + limit
        return self._sorted[first:end]

    async def store_async(
        self,
        key: bytes,
        value: memoryview,
        *,
        must_exist: bool = False,
        must_not_exist: bool = False,
    ) -> None:
        await self.store_record(key, value, must_exist=must_exist, must_not_exist=must_not_exist)

    async def store_record(
        self,
        key: bytes,
        value: memoryview,
        *,
        must_exist: bool = False,
        must_not_exist: bool = False,
    ) -> int:
        """Store ``value``; returns its sequence number (``seq_of`` tells whether it is current)."""
        value = check_store(
            self._limits,
            key,
            value,
            present=key in self._index,
            must_exist=must_exist,
            must_not_exist=must_not_exist,
        )
        size = value.nbytes
        adopted = self._lent.pop(id(value), None) is value
        base = memoryview(value.obj) if adopted else aligned_buffer(record_length(size))
        header = self._reserve_header(RecordKind.VALUE, key, size)
        source = None if adopted else value
        region, offset = self._reserve(header.record_length)
        header = attrs.evolve(header, generation=region.generation)
        header.pack_into(base)
        try:
            await self._write(region, offset, base[: header.record_length], header, source)
            self._stats.stores += 1
            self._stats.bytes_in += size
            self._commit(key, header, region, offset)
        finally:
            self._finish(key, header.seq)
        return header.seq

    async def retrieve_async(self, key: bytes) -> memoryview:
        value, _ = await self.retrieve_record(key)
        return value

    async def retrieve_record(self, key: bytes) -> tuple[memoryview, int]:
        """The value (read-only, in its own aligned buffer) and the sequence number it had."""
        self._stats.retrieves += 1
        for _ in range(3):  # retried only when a newer record replaced the one being read
            entry = self._index.get(key)
            if entry is None:
                break
            region = self._regions[entry.region]
            generation = region.generation
            buf = self._buffers.take(entry.record_len)  # the read fills all of it
            offset = self.superblock.region_offset(entry.region) + entry.offset

            def read(
                buf: memoryview = buf,
                offset: int = offset,
                entry: Entry = entry,
                gen: int = generation,
            ) -> bool:
                self.device.read_into(buf, offset)
                return self._verify(buf, key, entry, gen)

            intact = await self._offload(read)
            self._stats.bytes_read += entry.record_len
            if intact:
                self._stats.hits += 1
                self._stats.bytes_out += entry.value_len
                start = HEADER_SIZE  # metadata is always empty in records this engine writes
                return buf[start : start + entry.value_len].toreadonly(), entry.seq
            if self._index.get(key) is entry:
                # Nothing replaced it meanwhile, so the bytes on the device are bad.
                self._stats.crc_dropped += 1
                log.warning("record of %r at region %d+%d failed its check; dropped",
                            key, entry.region, entry.offset)  # fmt: skip
                self._drop(key)
                # Say so once (KV Unrecovered Error): a client that keeps copies elsewhere (the
                # EC cluster) can tell a corrupt fragment from a missing one and repair it.
                raise Unrecovered(f"stored value of {key!r} failed its CRC check; dropped")
            self._stats.stale_reads += 1
        self._stats.misses += 1
        raise KeyMissing(f"key {key!r} does not exist")

    async def delete_async(self, key: bytes) -> bool:
        self._check_key(key)
        existed = key in self._index
        if not existed and key not in self._latest:
            return False
        if existed:
            self._drop(key)
        # A tombstone, so a restart's scan does not bring back an older record of the key.
        header = self._reserve_header(RecordKind.TOMBSTONE, key, 0)
        region, offset = self._reserve(header.record_length)
        header = attrs.evolve(header, generation=region.generation)
        base = aligned_buffer(header.record_length)
        header.pack_into(base)
        try:
            await self._write(region, offset, base, header, None)
            self._stats.tombstones += 1
        finally:
            self._finish(key, header.seq)
        return existed

    async def flush(self) -> None:
        await self._offload(self.device.sync)
        self._stats.flushes += 1

    def close(self) -> None:
        """Checkpoint the index and close the device (blocking; call once nothing is in flight)."""
        if self.device.fd < 0:
            return
        try:
            for region in self._regions:
                if region.state is not RegionState.FREE and not region.gate.header_written(
                    region.generation
                ):
                    # Opened but never written: its header would still show the old generation,
                    # whose records the checkpoint no longer lists.
                    self._write_region_header(region)
            self._write_checkpoint()
            self.device.sync()
        finally:
            self.device.close()

    def describe(self) -> dict[str, object]:
        states = [r.state for r in self._regions]
        return {
            "engine": "flash",
            "path": self.device.path,
            "io_mode": self.device.mode.value,
            "region_size": self.superblock.region_size,
            "regions": len(self._regions),
            "regions_free": states.count(RegionState.FREE),
            "capacity_bytes": self._limits.capacity_bytes,
            "used_bytes": self._used,
            "keys": len(self._index),
            "max_value_length": self._limits.max_value_length,
            **attrs.asdict(self._stats),
        }

    # --- writing ----------------------------------------------------------------------------
    def _reserve_header(self, kind: RecordKind, key: bytes, size: int) -> RecordHeader:
        seq = self._next_seq
        self._next_seq += 1
        self._latest[key] = seq
        return RecordHeader(kind=kind, key=key, value_len=size, seq=seq, generation=0)

    def _reserve(self, length: int) -> tuple[Region, int]:
        """Space for ``length`` bytes in the open region, opening (and evicting) one if needed."""
        region = self._open
        if region is None or region.write_offset + length > self.superblock.region_size:
            region = self._rotate()
        offset = region.write_offset
        region.write_offset += length
        region.gate.begin(region.generation)
        return region, offset

    def _rotate(self) -> Region:
        if self._open is not None:
            self._open.state = RegionState.SEALED
            self._sealed.append(self._open)
        region = next((r for r in self._regions if r.state is RegionState.FREE), None)
        if region is None:
            region = self._sealed.popleft()
            self._evict(region)
        region.state = RegionState.OPEN
        region.generation = self._next_seq
        self._next_seq += 1
        region.write_offset = REGION_HEADER_SIZE
        self._open = region
        return region

    def _evict(self, region: Region) -> None:
        self._stats.regions_evicted += 1
        keys, region.keys = region.keys, set()
        for key in keys:
            entry = self._index.pop(key)
            self._used -= entry.record_len
            self._stats.evictions += 1
            self._stats.evicted_bytes += entry.record_len
        region.live_bytes = 0
        if keys:
            self._sorted = None
        if self.on_evict is not None:
            for key in keys:
                self.on_evict(key)

    async def _write(
        self,
        region: Region,
        offset: int,
        record: memoryview,
        header: RecordHeader,
        source: memoryview | None,
    ) -> None:
        started = False
        generation = header.generation

        def write() -> None:
            nonlocal started
            started = True
            try:
                if source is not None:
                    start = header.value_offset
                    record[start : start + header.value_len] = source
                seal(record, self._seed)
                region.gate.enter(generation, lambda: self._write_region_header(region, generation))
                self.device.write(record, self.superblock.region_offset(region.index) + offset)
            finally:
                region.gate.end(generation)

        try:
            await self._offload(write)
        finally:
            if not started:  # cancelled before a worker picked it up
                region.gate.end(generation)
        self._stats.bytes_written += len(record)

    def _write_region_header(self, region: Region, generation: int | None = None) -> None:
        generation = region.generation if generation is None else generation
        block = aligned_buffer(ALIGN)
        block[:20] = pack_region_header(region.index, generation, self.superblock.nonce)
        self.device.write(block, self.superblock.region_offset(region.index))
        region.gate.mark_header(generation)
        self._stats.bytes_written += ALIGN

    def _commit(self, key: bytes, header: RecordHeader, region: Region, offset: int) -> None:
        if self._latest.get(key) != header.seq:
            self._stats.superseded += 1
            return
        if region.generation != header.generation:
            # The region was recycled while the write ran: stored, then evicted at once. Anything
            # older of this key sat in an older (so already recycled) region.
            self._stats.evictions += 1
            self._stats.evicted_bytes += header.record_length
            if self.on_evict is not None:
                self.on_evict(key)
            return
        if key in self._index:
            self._drop(key)
        self._install(
            key, Entry(region.index, offset, header.record_length, header.value_len, header.seq)
        )

    def _finish(self, key: bytes, seq: int) -> None:
        if self._latest.get(key) == seq:
            del self._latest[key]

    def _install(self, key: bytes, entry: Entry) -> None:
        self._index[key] = entry
        region = self._regions[entry.region]
        region.keys.add(key)
        region.live_bytes += entry.record_len
        self._used += entry.record_len
        self._sorted = None

    def _drop(self, key: bytes) -> None:
        entry = self._index.pop(key)
        region = self._regions[entry.region]
        region.keys.discard(key)
        region.live_bytes -= entry.record_len
        self._used -= entry.record_len
        self._sorted = None

    def _verify(self, buf: memoryview, key: bytes, entry: Entry, generation: int) -> bool:
        header = unpack_header(buf)
        return (
            header is not None
            and header.kind is RecordKind.VALUE
            and header.key == key
            and header.seq == entry.seq
            and header.generation == generation
            and header.value_len == entry.value_len
            and header.meta_len == 0
            and header_intact(buf, self._seed)
            and body_intact(buf, header, self._seed)
        )

    def _check_key(self, key: bytes) -> None:
        if not 1 <= len(key) <= self._limits.max_key_length:
            raise InvalidKey(f"key of {len(key)} bytes is outside 1..{self._limits.max_key_length}")

    def _check_size(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"value size must not be negative, got {size}")
        if size > self._limits.max_value_length:
            raise ValueTooLarge(
                f"value of {size} bytes exceeds the maximum of {self._limits.max_value_length}"
            )

    # --- checkpoint and recovery ------------------------------------------------------------
    def _write_checkpoint(self) -> None:
        checkpoint = Checkpoint(
            next_seq=self._next_seq,
            generations=tuple(
                r.generation if r.state is not RegionState.FREE else 0 for r in self._regions
            ),
            entries=self._index,
        )
        need = ALIGN + align_up(len(self._regions) * 8 + len(self._index) * 48)
        buf = aligned_buffer(need)
        used = encode_checkpoint(checkpoint, buf)
        self.device.write(buf[:used], self.superblock.checkpoint_offset)

    def _read_checkpoint(self) -> Checkpoint | None:
        sb = self.superblock
        head = aligned_buffer(ALIGN)
        self.device.read_into(head, sb.checkpoint_offset)
        body_len = checkpoint_body_length(head)
        if body_len is None or ALIGN + body_len > sb.checkpoint_size:
            return None
        buf = aligned_buffer(ALIGN + body_len)
        self.device.read_into(buf, sb.checkpoint_offset)
        return decode_checkpoint(buf[: ALIGN + body_len], sb.region_count)

    def _recover(self, *, use_checkpoint: bool = True) -> None:
        sb = self.superblock
        checkpoint = self._read_checkpoint() if use_checkpoint else None
        self._stats.recovered_from_checkpoint = checkpoint is not None
        newest: dict[bytes, tuple[int, Entry | None]] = {}  # key -> (seq, entry or tombstone)
        top = checkpoint.next_seq if checkpoint else 1
        block = aligned_buffer(ALIGN)
        covered: set[int] = set()
        scan_buf: memoryview | None = None
        for region in self._regions:
            self.device.read_into(block, sb.region_offset(region.index))
            generation = unpack_region_header(block, region.index, sb.nonce)
            if generation is None:
                continue
            region.state = RegionState.SEALED
            region.generation = generation
            region.write_offset = sb.region_size  # never appended to again
            region.gate.mark_header(generation)
            top = max(top, generation + 1)
            if checkpoint is not None and checkpoint.generations[region.index] == generation:
                covered.add(region.index)
                continue
            scan_buf = scan_buf or aligned_buffer(sb.region_size)
            top = max(top, self._scan(region, scan_buf, newest))
        if checkpoint is not None:
            for key, entry in checkpoint.entries.items():
                if entry.region in covered and entry.seq > newest.get(key, (0, None))[0]:
                    newest[key] = (entry.seq, entry)
                top = max(top, entry.seq + 1)
        for key, (_, found) in newest.items():
            if found is not None:
                self._install(key, found)
        self._sealed = deque(
            sorted(
                (r for r in self._regions if r.state is RegionState.SEALED),
                key=lambda r: r.generation,
            )
        )
        self._next_seq = top
        self._stats.recovered_keys = len(self._index)
        log.info(
            "%s: %d keys recovered (%s, %d regions scanned, %d records dropped by CRC)",
            self.device.path, len(self._index),
            "checkpoint" if checkpoint is not None else "full scan",
            self._stats.recovery_scanned_regions, self._stats.crc_dropped,
        )  # fmt: skip

    def _scan(
        self, region: Region, buf: memoryview, newest: dict[bytes, tuple[int, Entry | None]]
    ) -> int:
        """Read ``region`` whole and note every intact record of its generation; next free seq."""
        self._stats.recovery_scanned_regions += 1
        self.device.read_into(buf, self.superblock.region_offset(region.index))
        top = 0
        pos = REGION_HEADER_SIZE
        end = len(buf)
        while pos + HEADER_SIZE <= end:
            header = unpack_header(buf[pos:])
            if header is None or header.generation != region.generation:
                pos += ALIGN  # nothing of this generation here: look on the next block
                continue
            if not header_intact(buf[pos:], self._seed) or pos + header.record_length > end:
                self._stats.crc_dropped += 1
                self.bad_records.append((region.index, pos))
                pos += ALIGN
                continue
            length = header.record_length
            if not body_intact(buf[pos : pos + length], header, self._seed):
                self._stats.crc_dropped += 1
                self.bad_records.append((region.index, pos))
                pos += length
                continue
            top = max(top, header.seq + 1)
            if header.seq > newest.get(header.key, (0, None))[0]:
                found = None
                if header.kind is RecordKind.VALUE and header.meta_len == 0:
                    found = Entry(region.index, pos, length, header.value_len, header.seq)
                newest[header.key] = (header.seq, found)
            pos += length
        return top


def _format(device: BlockDevice, region_size: int) -> Superblock:
    superblock = plan_geometry(device.size, region_size, secrets.randbits(63) | 1)
    log.warning(
        "%s: formatting %d bytes as %d regions of %d bytes", device.path, device.size,
        superblock.region_count, superblock.region_size,
    )  # fmt: skip
    zero = aligned_buffer(ALIGN)
    device.write(zero, superblock.checkpoint_offset)
    for index in range(superblock.region_count):
        device.write(zero, superblock.region_offset(index))
    block = aligned_buffer(ALIGN)
    block[: len(superblock.pack())] = superblock.pack()
    device.write(block, 0)  # last: a format cut short leaves no superblock, so it is redone
    device.sync()
    return superblock
