"""A DRAM key-value engine: one ordered map of key -> value buffer, bounded by a byte budget.

Not thread-safe: the target runs every namespace on one event loop, so no operation here is ever
interleaved with another. Every mutation is planned first and applied only once it cannot fail, so
an operation that raises leaves the engine exactly as it was.
"""

from __future__ import annotations

import bisect
import sys
import weakref
from collections import OrderedDict

import attrs

from kvext.engine.base import (
    CapacityExceeded,
    EngineLimits,
    EngineStats,
    InvalidKey,
    KeyMissing,
    ValueTooLarge,
    check_store,
)
from kvext.engine.buffers import MIN_POOLED, BufferPool, size_class
from kvext.engine.eviction import EvictionPolicy, policy_named

# Accounted per entry on top of key and value bytes, so a flood of tiny values is still bounded:
# roughly what the map slot, the key object and the buffer objects cost in CPython.
ENTRY_OVERHEAD = 64


def entry_cost(key: bytes, value_length: int) -> int:
    """The bytes an entry counts against ``capacity_bytes``."""
    return len(key) + value_length + ENTRY_OVERHEAD


class MemoryEngine:
    """A ``KeyValueEngine`` holding values in process memory, evicting per ``policy``."""

    def __init__(
        self,
        limits: EngineLimits,
        policy: str | EvictionPolicy = "lru",
        *,
        pool_bytes: int | None = None,
    ) -> None:
        self._limits = limits
        self._policy = policy if isinstance(policy, EvictionPolicy) else policy_named(policy)
        self._entries: OrderedDict[bytes, memoryview] = OrderedDict()  # oldest first
        self._used = 0
        self._stats = EngineStats()
        # Sorted keys for list_keys, rebuilt lazily: the key set changes on the hot path far more
        # often than anyone lists it.
        self._sorted: list[bytes] | None = None
        # Large values live in pooled buffers (``kvext.engine.buffers``). The pool sits outside
        # ``capacity_bytes``: by default an eighth of it, at most 1 GiB.
        self.pool = BufferPool(
            min(limits.capacity_bytes // 8, 1 << 30) if pool_bytes is None else pool_bytes
        )
        self._lent: weakref.WeakValueDictionary[int, memoryview] = weakref.WeakValueDictionary()
        self._pooled: dict[bytes, bytearray] = {}

    @property
    def limits(self) -> EngineLimits:
        return self._limits

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def allocate(self, size: int) -> memoryview:
        if size < 0:
            raise ValueError(f"value size must not be negative, got {size}")
        if size > self._limits.max_value_length:
            raise ValueTooLarge(
                f"value of {size} bytes exceeds the maximum of {self._limits.max_value_length}"
            )
        if size <= MIN_POOLED:
            return memoryview(bytearray(size))
        buf = self.pool.take(size)
        view = memoryview(buf)[:size]
        self._lent[id(buf)] = view  # so store() knows this view is a whole pooled buffer's prefix
        return view

    def store(
        self,
        key: bytes,
        value: memoryview,
        *,
        must_exist: bool = False,
        must_not_exist: bool = False,
    ) -> None:
        old = self._entries.get(key)
        value = check_store(
            self._limits,
            key,
            value,
            present=old is not None,
            must_exist=must_exist,
            must_not_exist=must_not_exist,
        )
        size = value.nbytes
        cost = entry_cost(key, size)
        if cost > self._limits.capacity_bytes:
            raise CapacityExceeded(
                f"entry of {cost} bytes can never fit in {self._limits.capacity_bytes} bytes"
            )

        victims = self._plan_evictions(key, cost, replacing=old)
        for victim in victims:
            self._remove(victim, evicted=True)
        if old is not None:
            self._used -= entry_cost(key, old.nbytes)
        else:
            self._sorted = None
        replaced = self._pooled.pop(key, None)
        pooled = self._adopt(value)
        if pooled is not None:
            # The entry keeps a view of its own, so the views that readers get are the only other
            # references to the buffer; _remove() recycles it once none is left.
            self._pooled[key] = pooled
            value = memoryview(pooled)[:size]
        # Assigning keeps an existing key's position; the policy decides whether it moves.
        self._entries[key] = value
        if old is not None and self._policy.refresh_on_store:
            self._entries.move_to_end(key)
        self._used += cost
        self._stats.stores += 1
        self._stats.bytes_in += size
        if replaced is not None:
            assert old is not None
            old.release()
            del old
            self._recycle(replaced)

    def retrieve(self, key: bytes) -> memoryview:
        self._stats.retrieves += 1
        value = self._entries.get(key)
        if value is None:
            self._stats.misses += 1
            raise KeyMissing(f"key {key!r} does not exist")
        self._stats.hits += 1
        self._stats.bytes_out += value.nbytes
        if self._policy.refresh_on_retrieve:
            self._entries.move_to_end(key)
        pooled = self._pooled.get(key)
        if pooled is not None:
            # A view of its own (not shared with the entry's), so it counts as a reference.
            value = memoryview(pooled)[: value.nbytes]
        # Read-only so no reader can change what later readers see.
        return value.toreadonly()

    # The async face of the ``KeyValueEngine`` protocol: DRAM never waits, so these answer at once.
    async def store_async(
        self,
        key: bytes,
        value: memoryview,
        *,
        must_exist: bool = False,
        must_not_exist: bool = False,
    ) -> None:
        self.store(key, value, must_exist=must_exist, must_not_exist=must_not_exist)

    async def retrieve_async(self, key: bytes) -> memoryview:
        return self.retrieve(key)

    async def delete_async(self, key: bytes) -> bool:
        return self.delete(key)

    async def flush(self) -> None:
        return None

    def close(self) -> None:
        self.pool.clear()

    def describe(self) -> dict[str, object]:
        return {
            "engine": "memory",
            "policy": self._policy.name,
            "capacity_bytes": self._limits.capacity_bytes,
            "used_bytes": self._used,
            "keys": len(self._entries),
            **attrs.asdict(self._stats),
        }

    def exists(self, key: bytes) -> bool:
        return key in self._entries

    def delete(self, key: bytes) -> bool:
        if key not in self._entries:
            return False
        self._remove(key, evicted=False)
        return True

    def list_keys(self, start: bytes = b"", limit: int | None = None) -> list[bytes]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        if self._sorted is None:
            self._sorted = sorted(self._entries)
        first = bisect.bisect_left(self._sorted, start)  # start itself when present
        end = len(self._sorted) if limit is None else first + limit
        return self._sorted[first:end]

    def _check_key(self, key: bytes) -> None:
        if not 1 <= len(key) <= self._limits.max_key_length:
            raise InvalidKey(f"key of {len(key)} bytes is outside 1..{self._limits.max_key_length}")

    def _plan_evictions(
        self, key: bytes, cost: int, *, replacing: memoryview | None
    ) -> list[bytes]:
        """The keys to drop, oldest first, so ``key`` fits; raises before anything changes."""
        used = self._used + cost
        count = len(self._entries)
        if replacing is not None:
            used -= entry_cost(key, replacing.nbytes)
        else:
            count += 1
        max_keys = self._limits.max_keys

        def fits() -> bool:
            return used <= self._limits.capacity_bytes and (max_keys == 0 or count <= max_keys)

        if fits():
            return []
        if not self._policy.evicts:
            raise CapacityExceeded(
                f"no room for {cost} bytes: {self._used} of {self._limits.capacity_bytes} used,"
                f" {len(self._entries)} keys, and policy {self._policy.name!r} never evicts"
            )
        victims: list[bytes] = []
        for candidate, candidate_value in self._entries.items():
            if candidate == key:
                continue  # never evict the key being stored; its old bytes are already deducted
            victims.append(candidate)
            used -= entry_cost(candidate, candidate_value.nbytes)
            count -= 1
            if fits():
                return victims
        # Unreachable while cost <= capacity_bytes and max_keys >= 1; kept as a guard.
        raise CapacityExceeded(f"no room for {cost} bytes even after evicting every other key")

    def _remove(self, key: bytes, *, evicted: bool) -> None:
        value = self._entries.pop(key)
        cost = entry_cost(key, value.nbytes)
        self._used -= cost
        self._sorted = None
        if evicted:
            self._stats.evictions += 1
            self._stats.evicted_bytes += cost
        pooled = self._pooled.pop(key, None)
        if pooled is not None:
            value.release()
            del value
            self._recycle(pooled)

    def _adopt(self, value: memoryview) -> bytearray | None:
        """The pooled buffer behind ``value`` if ``value`` is one that allocate() lent out."""
        obj = value.obj
        if not isinstance(obj, bytearray) or self._lent.get(id(obj)) is not value:
            return None
        del self._lent[id(obj)]
        return obj if len(obj) == size_class(value.nbytes) else None

    def _recycle(self, buf: bytearray) -> None:
        # References now: the caller's variable, this parameter and getrefcount's argument. Any
        # more is a reader's view (a Retrieve still sending): then the buffer is left to the GC.
        if sys.getrefcount(buf) <= 3:
            self.pool.give(buf)
