"""Record buffers come back for reuse once no view of them is left, and never while one is."""

from __future__ import annotations

import ctypes

from kvext.engine.device import AlignedBufferPool
from kvext.engine.record import ALIGN


def test_a_dropped_buffer_is_reused_a_held_one_is_not() -> None:
    pool = AlignedBufferPool()
    first = pool.take(10_000)
    assert len(first) == 3 * ALIGN  # rounded up to whole units
    first[:5] = b"hello"
    held = first[:5]  # a reader still sending part of it
    del first
    second = pool.take(10_000)
    assert pool.reused == 0
    assert bytes(held) == b"hello"  # untouched
    second[:5] = b"world"
    del held
    third = pool.take(10_000)  # the first buffer is free now
    assert pool.reused == 1
    assert bytes(second[:5]) == b"world"  # still the caller's, not handed out again
    del second, third
    assert len(pool.take(10_000)) == 3 * ALIGN
    assert pool.reused == 2


def test_buffers_are_page_aligned_and_bounded() -> None:
    pool = AlignedBufferPool(max_bytes=2 * ALIGN)
    views = [pool.take(ALIGN) for _ in range(4)]
    assert pool.tracked_bytes == 2 * ALIGN  # the rest are untracked, freed as usual
    for view in views:
        assert len(view) == ALIGN
        assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0  # O_DIRECT needs it
