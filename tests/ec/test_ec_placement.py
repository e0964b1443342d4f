"""Rendezvous placement: distinct targets, weight-proportional, and only what must move moves."""

from __future__ import annotations

import collections

from ec.placement import Member, object_id, place

OBJECTS = [object_id(f"key-{i}") for i in range(4000)]
N = 6  # k + m


def _holdings(members: list[Member]) -> dict[bytes, set[str]]:
    return {oid: {m.name for m in place(oid, members, N)} for oid in OBJECTS}


def test_placement_is_distinct_and_deterministic() -> None:
    members = [Member(f"t{i}") for i in range(9)]
    for oid in OBJECTS[:200]:
        names = [m.name for m in place(oid, members, N)]
        assert len(set(names)) == N
        assert names == [m.name for m in place(oid, list(reversed(members)), N)]


def test_a_join_moves_the_ideal_share_of_fragments() -> None:
    """Fragments that move on a join = fragments the new target gets; ideal = its fair share."""
    old = [Member(f"t{i}") for i in range(8)]
    new = [*old, Member("t8")]
    before, after = _holdings(old), _holdings(new)
    moved = sum(len(after[oid] - before[oid]) for oid in OBJECTS)
    assert all(after[oid] - before[oid] <= {"t8"} for oid in OBJECTS)  # nothing else shuffles
    total = len(OBJECTS) * N
    ideal = total / len(new)  # t8's fair share of fragments
    assert abs(moved - ideal) / ideal < 0.06, (moved, ideal)


def test_a_leave_moves_only_the_leavers_fragments() -> None:
    old = [Member(f"t{i}") for i in range(9)]
    new = [m for m in old if m.name != "t3"]
    before, after = _holdings(old), _holdings(new)
    moved = sum(len(after[oid] - before[oid]) for oid in OBJECTS)
    lost = sum(1 for oid in OBJECTS if "t3" in before[oid])
    assert moved == lost  # each of t3's fragments moves once, nothing else


def test_weights_set_the_share() -> None:
    members = [Member("big", 3.0), *(Member(f"t{i}") for i in range(8))]
    counts = collections.Counter(m.name for oid in OBJECTS for m in place(oid, members, 1))
    share = counts["big"] / len(OBJECTS)
    assert 0.22 < share < 0.32  # 3 / 11 = 0.273
