"""Virtual time, two ways.

Protocol mode runs the real (async) target and initiator under trio with
``trio.testing.MockClock(autojump_threshold=0)``: ``anyio.sleep``, ``fail_after`` and
``current_time`` all read the mock clock, which jumps straight to the next deadline whenever every
task is blocked, so a simulated hour costs only the CPU its events need and never sleeps in wall
time. ``run_virtual`` starts such a run.

trio deliberately randomises the order in which tasks that became ready together run (it reverses
each batch with probability 1/2, from ``trio._core._run._r``), and tasks woken by one cancellation
come out of a ``set``. For a run to be a function of its seed alone, ``run_virtual`` seeds that
generator from the scenario's seed and turns on the ordering trio itself uses under Hypothesis
(ready tasks sorted by creation order, then shuffled by the seeded generator), restoring both on
exit. This touches two trio internals; if they are missing (a future trio), the run still works
and the simulator's own ordering (``(virtual_time, seq)`` everywhere) still holds, but ties between
tasks may go either way.

Analytic mode needs no event loop at all: ``EventQueue`` is a heap of ``(time, seq, item)``, so two
events at the same instant always come out in the order they were scheduled.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class EventQueue(Generic[T]):
    """Events ordered by ``(virtual_time, seq)``: ties go to the one scheduled first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self.now = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, time: float, item: T) -> None:
        if time < self.now:
            raise ValueError(f"cannot schedule at {time} before now ({self.now})")
        heapq.heappush(self._heap, (time, next(self._seq), item))

    def peek_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop(self) -> tuple[float, T]:
        """The earliest event; the clock moves to its time."""
        time, _, item = heapq.heappop(self._heap)
        self.now = time
        return time, item


def run_virtual(
    fn: Callable[..., Awaitable[T]], *args: Any, seed: int = 0, start: float = 0.0
) -> T:
    """Run ``fn(*args)`` under trio in virtual time, deterministically for ``seed``."""
    import trio
    import trio.testing

    clock = trio.testing.MockClock(autojump_threshold=0)
    if start:
        clock.jump(start)
    core: Any = getattr(trio, "_core", None)
    run_module: Any = getattr(core, "_run", None)
    rng: random.Random | None = getattr(run_module, "_r", None)
    saved_state = rng.getstate() if rng is not None else None
    saved_flag = getattr(run_module, "_ALLOW_DETERMINISTIC_SCHEDULING", None)
    if rng is not None:
        rng.seed(f"gpucache-sim:{seed}")
    if saved_flag is not None:
        run_module._ALLOW_DETERMINISTIC_SCHEDULING = True
    try:
        result: T = trio.run(fn, *args, clock=clock)
        return result
    finally:
        if rng is not None and saved_state is not None:
            rng.setstate(saved_state)
        if saved_flag is not None:
            run_module._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag
