"""The get decision table, driven directly (no sockets)."""

from __future__ import annotations

import os

from ec.codec import ErasureCode, Fragment
from ec.readplan import ReadOutcome, ReadPlan
from kvext.framing import BYTES_LAYOUT


def _fragments(size: int, generation: int) -> list[Fragment]:
    return ErasureCode(4, 2).encode("k", BYTES_LAYOUT, memoryview(os.urandom(size)), generation)


def _plan() -> ReadPlan:
    return ReadPlan(k=4, m=2, write_quorum=5, candidates=6)


def test_coded_read_asks_k_then_one_more_per_failure() -> None:
    plan, frags = _plan(), _fragments(200_000, 1)
    assert plan.wanted() == 4
    ranks = [plan.launch() for _ in range(4)]
    plan.on_unavailable(ranks[0])
    assert plan.wanted() == 1
    plan.launch()
    for r in ranks[1:]:
        plan.on_fragment(r, frags[r])
    assert plan.outcome() is ReadOutcome.PENDING
    plan.on_fragment(4, frags[4])
    assert plan.outcome() is ReadOutcome.FOUND
    assert [f.index for f in plan.best() or []] == [1, 2, 3, 4]


def test_an_old_generation_never_hides_the_new_one() -> None:
    plan, old, new = _plan(), _fragments(200_000, 1), _fragments(200_000, 2)
    for _ in range(4):
        plan.launch()
    plan.on_fragment(0, old[0])  # a target that missed the overwrite
    for r in (1, 2, 3):
        plan.on_fragment(r, new[r])
    assert plan.outcome() is ReadOutcome.PENDING
    assert plan.wanted() == 1
    plan.on_fragment(plan.launch(), new[4])
    assert {f.header.generation for f in plan.best() or []} == {2}


def test_replicas_wait_for_a_read_quorum_and_take_the_newest() -> None:
    plan = _plan()
    stale, fresh = _fragments(100, 1), _fragments(100, 2)
    for _ in range(4):
        plan.launch()
    plan.on_fragment(0, stale[0])
    assert plan.outcome() is ReadOutcome.PENDING  # one replica answer is not a read quorum
    plan.on_fragment(1, fresh[1])
    assert plan.outcome() is ReadOutcome.FOUND
    assert (plan.best() or [])[0].header.generation == 2


def test_absent_after_enough_misses_unavailable_when_all_down() -> None:
    plan = _plan()
    for _ in range(4):
        plan.launch()
    plan.on_missing(0)
    plan.on_missing(1)
    assert plan.outcome() is ReadOutcome.ABSENT
    down = _plan()
    while down.wanted():
        for _ in range(down.wanted()):
            down.on_unavailable(down.launch())
    assert down.outcome() is ReadOutcome.UNAVAILABLE
    assert down.launched == 6
