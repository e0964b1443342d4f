from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvext.engine.base import (
    CapacityExceeded,
    EngineError,
    EngineLimits,
    EngineStatus,
    InvalidKey,
    KeyMissing,
    KeyPresent,
    KeyValueEngine,
    ValueTooLarge,
)
from kvext.engine.eviction import POLICIES, policy_named
from kvext.engine.memory import ENTRY_OVERHEAD, MemoryEngine, entry_cost


def value(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


def engine(capacity: int = 1 << 20, policy: str = "lru", **kw: int) -> MemoryEngine:
    limits = EngineLimits(
        max_value_length=kw.pop("max_value_length", 4096), capacity_bytes=capacity, **kw
    )
    return MemoryEngine(limits, policy)


def test_is_a_key_value_engine() -> None:
    assert isinstance(engine(), KeyValueEngine)


def test_store_retrieve_overwrite_delete() -> None:
    e = engine()
    e.store(b"k", value(b"one"))
    assert e.exists(b"k")
    assert bytes(e.retrieve(b"k")) == b"one"
    e.store(b"k", value(b"three"))
    assert bytes(e.retrieve(b"k")) == b"three"
    assert len(e) == 1
    assert e.used_bytes == entry_cost(b"k", 5)
    assert e.delete(b"k") is True
    assert e.delete(b"k") is False
    assert not e.exists(b"k")
    assert e.used_bytes == 0
    with pytest.raises(KeyMissing) as info:
        e.retrieve(b"k")
    assert info.value.kv_status == 0x87


def test_store_takes_ownership_without_copy_and_retrieve_is_read_only() -> None:
    e = engine()
    buf = e.allocate(4)
    buf[:] = b"abcd"
    e.store(b"k", buf)
    got = e.retrieve(b"k")
    assert got.readonly
    assert got.obj is buf.obj  # the very buffer that was allocated
    with pytest.raises(TypeError):
        got[0] = 0


def test_store_accepts_non_byte_formats() -> None:
    e = engine()
    e.store(b"k", memoryview(bytearray(8)).cast("I"))
    assert e.retrieve(b"k").nbytes == 8
    assert e.used_bytes == entry_cost(b"k", 8)


def test_view_before_overwrite_keeps_old_bytes() -> None:
    e = engine()
    e.store(b"k", value(b"old"))
    before = e.retrieve(b"k")
    e.store(b"k", value(b"new!"))
    e.delete(b"k")
    assert bytes(before) == b"old"


def test_must_exist_and_must_not_exist() -> None:
    e = engine()
    with pytest.raises(KeyMissing):
        e.store(b"k", value(b"x"), must_exist=True)
    assert not e.exists(b"k")
    e.store(b"k", value(b"x"), must_not_exist=True)
    with pytest.raises(KeyPresent) as info:
        e.store(b"k", value(b"y"), must_not_exist=True)
    assert info.value.kv_status == 0x89
    e.store(b"k", value(b"z"), must_exist=True)
    assert bytes(e.retrieve(b"k")) == b"z"
    with pytest.raises(ValueError, match="exclusive"):
        e.store(b"k", value(b"z"), must_exist=True, must_not_exist=True)


def test_value_too_large() -> None:
    e = engine(max_value_length=8)
    with pytest.raises(ValueTooLarge) as info:
        e.allocate(9)
    assert info.value.kv_status == 0x85
    assert e.allocate(8).nbytes == 8
    assert e.allocate(0).nbytes == 0
    with pytest.raises(ValueTooLarge):
        e.store(b"k", value(b"123456789"))
    with pytest.raises(ValueError, match="negative"):
        e.allocate(-1)


def test_key_length_checked() -> None:
    e = engine(max_key_length=4)
    with pytest.raises(InvalidKey) as info:
        e.store(b"", value(b"x"))
    assert info.value.kv_status == EngineStatus.INVALID_KEY_SIZE
    assert int(EngineStatus.INVALID_KEY_SIZE) == 0x86
    with pytest.raises(InvalidKey):
        e.store(b"12345", value(b"x"))
    e.store(b"1234", value(b"x"))


def test_list_keys_sorted_with_start_and_limit() -> None:
    e = engine()
    for k in (b"d", b"b", b"a", b"c", b"e"):
        e.store(k, value(k))
    assert e.list_keys() == [b"a", b"b", b"c", b"d", b"e"]
    assert e.list_keys(b"c") == [b"c", b"d", b"e"]
    assert e.list_keys(b"bb", limit=2) == [b"c", b"d"]
    assert e.list_keys(b"z") == []
    assert e.list_keys(limit=0) == []
    e.delete(b"c")
    e.store(b"ca", value(b"x"))
    assert e.list_keys(b"c") == [b"ca", b"d", b"e"]
    with pytest.raises(ValueError, match="limit"):
        e.list_keys(limit=-1)


def test_lru_evicts_least_recently_used_and_retrieve_refreshes() -> None:
    cost = entry_cost(b"a", 10)
    e = engine(capacity=3 * cost)
    for k in (b"a", b"b", b"c"):
        e.store(k, value(bytes(10)))
    e.retrieve(b"a")  # now b is the oldest
    e.store(b"d", value(bytes(10)))
    assert e.list_keys() == [b"a", b"c", b"d"]
    e.store(b"c", value(bytes(10)))  # a store refreshes too: a is now the oldest
    e.store(b"e", value(bytes(10)))
    assert e.list_keys() == [b"c", b"d", b"e"]
    assert e.stats.evictions == 2
    assert e.stats.evicted_bytes == 2 * cost
    assert e.used_bytes == 3 * cost


def test_fifo_ignores_retrieves() -> None:
    cost = entry_cost(b"a", 10)
    e = engine(capacity=3 * cost, policy="fifo")
    for k in (b"a", b"b", b"c"):
        e.store(k, value(bytes(10)))
    e.retrieve(b"a")
    e.store(b"d", value(bytes(10)))
    assert e.list_keys() == [b"b", b"c", b"d"]


def test_large_store_evicts_several() -> None:
    e = engine(capacity=4 * entry_cost(b"a", 10))
    for k in (b"a", b"b", b"c", b"d"):
        e.store(k, value(bytes(10)))
    e.store(b"e", value(bytes(10 + 2 * entry_cost(b"a", 10))))
    assert e.list_keys() == [b"d", b"e"]
    assert e.stats.evictions == 3


def test_overwrite_never_evicts_itself() -> None:
    cost = entry_cost(b"a", 10)
    e = engine(capacity=2 * cost + 10)
    e.store(b"a", value(bytes(10)))
    e.store(b"b", value(bytes(10)))
    # a is the oldest; growing it must evict b, not a's own old entry, and keep the new value
    e.store(b"a", value(b"\x01" * 21))
    assert e.list_keys() == [b"a"]
    assert bytes(e.retrieve(b"a")) == b"\x01" * 21
    assert e.used_bytes == entry_cost(b"a", 21)


def test_entry_that_can_never_fit() -> None:
    e = engine(capacity=100)
    e.store(b"a", value(b"x"))
    with pytest.raises(CapacityExceeded) as info:
        e.store(b"b", value(bytes(100 - ENTRY_OVERHEAD)))
    assert info.value.kv_status == 0x81
    assert e.list_keys() == [b"a"]  # nothing was evicted for a store that failed
    assert e.used_bytes == entry_cost(b"a", 1)


def test_none_policy_raises_and_leaves_engine_unchanged() -> None:
    cost = entry_cost(b"a", 10)
    e = engine(capacity=2 * cost, policy="none")
    e.store(b"a", value(bytes(10)))
    e.store(b"b", value(bytes(10)))
    with pytest.raises(CapacityExceeded, match="never evicts"):
        e.store(b"c", value(bytes(10)))
    with pytest.raises(CapacityExceeded):
        e.store(b"a", value(bytes(11)))  # an overwrite that grows does not fit either
    e.store(b"a", value(bytes(9)))  # one that shrinks does
    assert e.list_keys() == [b"a", b"b"]
    assert e.used_bytes == entry_cost(b"a", 9) + entry_cost(b"b", 10)
    assert e.stats.evictions == 0


def test_max_keys_bound() -> None:
    e = engine(max_keys=2)
    for k in (b"a", b"b", b"c"):
        e.store(k, value(b"x"))
    assert e.list_keys() == [b"b", b"c"]
    e.store(b"c", value(b"y"))  # an overwrite needs no new slot
    assert len(e) == 2
    n = engine(max_keys=1, policy="none")
    n.store(b"a", value(b"x"))
    with pytest.raises(CapacityExceeded):
        n.store(b"b", value(b"x"))


def test_stats() -> None:
    e = engine()
    e.store(b"a", value(b"x"))
    e.retrieve(b"a")
    with pytest.raises(KeyMissing):
        e.retrieve(b"b")
    s = e.stats
    assert (s.stores, s.retrieves, s.hits, s.misses, s.evictions) == (1, 2, 1, 1, 0)


def test_policy_registry() -> None:
    assert set(POLICIES) == {"lru", "fifo", "none"}
    assert policy_named("lru").refresh_on_retrieve
    with pytest.raises(ValueError, match="known: fifo, lru, none"):
        policy_named("random")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        engine(policy="arc")


def test_errors_are_engine_errors() -> None:
    for cls in (ValueTooLarge, CapacityExceeded, KeyMissing, KeyPresent, InvalidKey):
        assert issubclass(cls, EngineError)


def test_limits_validated() -> None:
    with pytest.raises(ValueError, match="max_key_length"):
        EngineLimits(max_value_length=1, capacity_bytes=1, max_key_length=17)
    with pytest.raises(ValueError, match="capacity_bytes"):
        EngineLimits(max_value_length=1, capacity_bytes=0)


KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"])
SIZES = st.integers(min_value=0, max_value=200)


class MemoryEngineModel(RuleBasedStateMachine):
    """The engine against a dict: what it holds is always what was stored and not dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 4 * ENTRY_OVERHEAD + 400
        self.model: dict[bytes, bytes] = {}

    @initialize(policy=st.sampled_from(sorted(POLICIES)))
    def start(self, policy: str) -> None:
        limits = EngineLimits(max_value_length=300, capacity_bytes=self.capacity)
        self.engine = MemoryEngine(limits, policy)

    @rule(
        key=KEYS, size=SIZES, fill=st.integers(0, 255), mode=st.sampled_from(["", "exist", "new"])
    )
    def store(self, key: bytes, size: int, fill: int, mode: str) -> None:
        data = bytes([fill]) * size
        before = dict(self.model)
        try:
            self.engine.store(
                key, value(data), must_exist=mode == "exist", must_not_exist=mode == "new"
            )
        except KeyMissing:
            assert mode == "exist"
            assert key not in self.model
        except KeyPresent:
            assert mode == "new"
            assert key in self.model
        except CapacityExceeded:
            # only "none" refuses a value that fits alone; it refuses exactly what would overflow
            assert self.engine.policy.name == "none"
            others = sum(entry_cost(k, len(v)) for k, v in self.model.items() if k != key)
            assert others + entry_cost(key, size) > self.capacity
        else:
            # evicted keys are gone from the model; survivors are unchanged
            self.model[key] = data
            for k in list(self.model):
                if not self.engine.exists(k):
                    assert k != key
                    assert self.engine.policy.evicts
                    del self.model[k]
            assert all(self.model[k] == before[k] for k in self.model if k != key)
            return
        assert before == self.model

    @rule(key=KEYS)
    def retrieve(self, key: bytes) -> None:
        if key in self.model:
            assert bytes(self.engine.retrieve(key)) == self.model[key]
        else:
            with pytest.raises(KeyMissing):
                self.engine.retrieve(key)

    @rule(key=KEYS)
    def delete(self, key: bytes) -> None:
        assert self.engine.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(
        start=st.sampled_from([b"", b"a", b"c", b"cc", b"z"]), limit=st.none() | st.integers(0, 5)
    )
    def list_keys(self, start: bytes, limit: int | None) -> None:
        expected = sorted(k for k in self.model if k >= start)
        if limit is not None:
            expected = expected[:limit]
        assert self.engine.list_keys(start, limit) == expected

    @invariant()
    def accounting(self) -> None:
        e = self.engine
        assert e.used_bytes <= self.capacity
        assert e.used_bytes == sum(entry_cost(k, len(v)) for k, v in self.model.items())
        assert len(e) == len(self.model)
        assert all(e.exists(k) for k in self.model)


MemoryEngineModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_memory_engine_model = MemoryEngineModel.TestCase
