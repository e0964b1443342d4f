"""Value buffers are recycled only once no reader holds a view of them."""

from __future__ import annotations

from kvext.engine.base import EngineLimits
from kvext.engine.buffers import MIN_POOLED, BufferPool, size_class
from kvext.engine.memory import MemoryEngine

BIG = 1 << 20


def _engine(capacity: int = 64 << 20) -> MemoryEngine:
    return MemoryEngine(
        EngineLimits(capacity_bytes=capacity, max_value_length=8 << 20), pool_bytes=16 << 20
    )


def _store(engine: MemoryEngine, key: bytes, fill: int, size: int = BIG) -> None:
    view = engine.allocate(size)
    view[:] = bytes([fill]) * size
    engine.store(key, view)


def test_size_classes_bound_slack() -> None:
    assert size_class(100) == 100
    assert size_class(MIN_POOLED) == MIN_POOLED
    for size in (MIN_POOLED + 1, BIG, BIG + 40, 32 << 20, (32 << 20) + 40, 80 << 20):
        cls = size_class(size)
        assert size <= cls <= size * 1.125


def test_overwrite_recycles_the_old_buffer() -> None:
    engine = _engine()
    _store(engine, b"k", 1)
    _store(engine, b"k", 2)
    assert engine.pool.stats.returned == 1
    _store(engine, b"k", 3)
    assert engine.pool.stats.reused == 1
    assert bytes(engine.retrieve(b"k")) == b"\x03" * BIG


def test_delete_and_eviction_recycle() -> None:
    engine = _engine(capacity=3 * BIG)
    _store(engine, b"a", 1)
    engine.delete(b"a")
    assert engine.pool.stats.returned == 1
    for i in range(5):  # only two fit: the others are evicted
        _store(engine, bytes([65 + i]), i)
    assert engine.stats.evictions >= 2
    assert engine.pool.stats.returned >= 3
    assert bytes(engine.retrieve(b"E")) == b"\x04" * BIG


def test_a_reader_view_keeps_its_buffer_out_of_the_pool() -> None:
    engine = _engine()
    _store(engine, b"k", 7)
    reader = engine.retrieve(b"k")[:100]  # a Retrieve still sending
    _store(engine, b"k", 8)
    assert engine.pool.stats.returned == 0
    _store(engine, b"other", 9)  # must not land in the reader's buffer
    assert bytes(reader) == b"\x07" * 100
    assert bytes(engine.retrieve(b"k")[:4]) == b"\x08" * 4


def test_small_values_are_not_pooled() -> None:
    engine = _engine()
    _store(engine, b"s", 1, size=4096)
    _store(engine, b"s", 2, size=4096)
    assert engine.pool.stats.returned == 0
    assert bytes(engine.retrieve(b"s")) == b"\x02" * 4096


def test_pool_is_bounded() -> None:
    pool = BufferPool(max_bytes=2 * BIG)
    for _ in range(4):
        pool.give(bytearray(BIG))
    assert pool.free_bytes == 2 * BIG
    assert pool.stats.dropped == 2
