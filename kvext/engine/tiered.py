"""A DRAM tier in front of a flash engine.

Flash is the system of record: every Store is written there first (write-through), so everything
acknowledged survives a restart; DRAM holds a subset (an LRU ``MemoryEngine``) and answers a
Retrieve without I/O when it can. Values are shared, not copied: the buffer a Store's data landed
in is the one written to flash and the one DRAM keeps; a value read from flash is admitted as read.

Admission (``Admission``): ON_READ (the default) puts a value in DRAM when it is read back from
flash; ON_WRITE puts every stored value there. Reinsertion: when flash recycles a region, the keys
DRAM still holds (the hot ones: DRAM is LRU) are written back to flash from DRAM instead of being
evicted, so keeping them costs no flash read (CacheLib reinserts hot items the same way, reading
them from the region being reclaimed).

Measured (a lookup-then-fill loop, the LLM prefix-cache pattern: Retrieve, and on a miss Store;
40,000 operations on 4,000 keys of 8 KiB drawn Zipf(alpha); 12 MiB flash in 256 KiB regions,
2 MiB DRAM; overall hit ratio / DRAM hit ratio / flash MB written)::

    alpha  admission  reinsert   hit    DRAM hit   flash MB
    0.8    write      no         0.545  0.295      227
    0.8    write      yes        0.551  0.301      227
    0.8    read       no         0.545  0.364      227
    0.8    read       yes        0.583  0.407      266
    1.0    write      no         0.727  0.532      136
    1.0    read       yes        0.759  0.627      155

Admission on write fills DRAM with values stored after a miss that are never read again and pushes
the hot ones out; admission on read keeps DRAM for values read at least twice, and reinsertion then
has hot keys to save. Together they add 3-4 points of hit ratio and 10 points of DRAM hits, for
about 15 % more flash writes.
"""

from __future__ import annotations

import enum

import attrs

from kvext.engine.base import EngineError, EngineLimits, EngineStats, KeyMissing, flat_bytes
from kvext.engine.flash import FlashEngine
from kvext.engine.memory import MemoryEngine


class Admission(enum.Enum):
    ON_WRITE = "write"
    ON_READ = "read"


@attrs.define
class TieredStats(EngineStats):
    """Counters of the whole engine; ``dram_*``/``flash_*`` split hits and misses per tier."""

    dram_hits: int = 0
    dram_misses: int = 0
    flash_hits: int = 0
    flash_misses: int = 0
    admissions: int = 0
    reinsertions: int = 0


class TieredEngine:
    """A ``KeyValueEngine``: ``dram`` caches a subset of ``flash``."""

    def __init__(
        self,
        dram: MemoryEngine,
        flash: FlashEngine,
        *,
        admission: Admission = Admission.ON_READ,
        reinsert: bool = True,
    ) -> None:
        self.dram = dram
        self.flash = flash
        self.admission = admission
        self.reinsert = reinsert
        self._stats = TieredStats()
        self._reinsert_queue: list[bytes] = []
        flash.on_evict = self._flash_evicted

    @property
    def limits(self) -> EngineLimits:
        return self.flash.limits

    @property
    def stats(self) -> TieredStats:
        return self._stats

    @property
    def used_bytes(self) -> int:
        return self.flash.used_bytes

    def __len__(self) -> int:
        return len(self.flash)

    def allocate(self, size: int) -> memoryview:
        return self.flash.allocate(size)

    def exists(self, key: bytes) -> bool:
        return self.flash.exists(key) or self.dram.exists(key)

    def list_keys(self, start: bytes = b"", limit: int | None = None) -> list[bytes]:
        return self.flash.list_keys(start, limit)

    async def store_async(
        self,
        key: bytes,
        value: memoryview,
        *,
        must_exist: bool = False,
        must_not_exist: bool = False,
    ) -> None:
        value = flat_bytes(value)
        seq = await self.flash.store_record(
            key, value, must_exist=must_exist, must_not_exist=must_not_exist
        )
        self._stats.stores += 1
        self._stats.bytes_in += value.nbytes
        if self.flash.seq_of(key) == seq:  # not superseded or evicted meanwhile
            if self.admission is Admission.ON_WRITE:
                self._admit(key, value)
            else:
                self.dram.delete(key)  # the old value, if DRAM had it
        await self._reinsert_evicted()

    async def retrieve_async(self, key: bytes) -> memoryview:
        self._stats.retrieves += 1
        if self.dram.exists(key):
            value = self.dram.retrieve(key)
            self._stats.dram_hits += 1
            self._stats.hits += 1
            self._stats.bytes_out += value.nbytes
            return value
        self._stats.dram_misses += 1
        try:
            value, seq = await self.flash.retrieve_record(key)
        except KeyMissing:
            self._stats.flash_misses += 1
            self._stats.misses += 1
            raise
        self._stats.flash_hits += 1
        self._stats.hits += 1
        self._stats.bytes_out += value.nbytes
        if self.admission is Admission.ON_READ and self.flash.seq_of(key) == seq:
            self._admit(key, value)
        return value

    async def delete_async(self, key: bytes) -> bool:
        in_dram = self.dram.delete(key)
        return await self.flash.delete_async(key) or in_dram

    async def flush(self) -> None:
        await self.flash.flush()

    def close(self) -> None:
        self.dram.close()
        self.flash.close()

    def describe(self) -> dict[str, object]:
        return {
            "engine": "tiered",
            "admission": self.admission.value,
            "reinsert": self.reinsert,
            "capacity_bytes": self.limits.capacity_bytes,
            "used_bytes": self.used_bytes,
            "keys": len(self),
            **attrs.asdict(self._stats),
            "dram": self.dram.describe(),
            "flash": self.flash.describe(),
        }

    def _admit(self, key: bytes, value: memoryview) -> None:
        try:
            self.dram.store(key, value)
        except EngineError:
            self.dram.delete(key)  # larger than the DRAM tier: serve it from flash
            return
        self._stats.admissions += 1

    def _flash_evicted(self, key: bytes) -> None:
        # Called synchronously from inside a flash Store; the write-back waits for its end.
        if self.flash.exists(key) or self.flash.pending(key):
            return  # a newer record of the key is there or on its way
        if self.reinsert and self.dram.exists(key):
            self._reinsert_queue.append(key)
        else:
            self.dram.delete(key)
            self._stats.evictions += 1

    async def _reinsert_evicted(self) -> None:
        queue, self._reinsert_queue = self._reinsert_queue, []
        for key in queue:
            if self.flash.exists(key) or self.flash.pending(key) or not self.dram.exists(key):
                continue  # stored or deleted again meanwhile
            value = self.dram.retrieve(key)
            try:
                await self.flash.store_record(key, value)
            except EngineError:
                self.dram.delete(key)
                continue
            self._stats.reinsertions += 1
