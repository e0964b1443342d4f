"""Where a value's fragments live: weighted rendezvous (highest-random-weight) hashing.

Every target scores every object with ``-weight / ln(u)``, ``u`` a uniform hash of (object id,
target name) in (0, 1); an object lives on its top ``n`` targets. This is the weighted form of
rendezvous hashing (Schindelhauer and Schomaker's logarithmic method): a target's chance of winning
is proportional to its weight, and when a target joins or leaves, an object's top ``n`` changes by
at most that one target, so only the fragments that must move do.

The fragment index is not part of the placement. A fragment's index lives in its own header, and a
target of an object's set holds exactly one fragment of it, under the object id. If indices were
pinned to targets (index i on the i-th ranked target, or each index hashed on its own), a join
would shuffle indices among targets that stay: no function of the member set alone can keep every
index in place across joins (three targets, two slots already shows it), and measured, ranked
order moves 3.4x and per-index rendezvous 1.5x the ideal. Keeping the index in the fragment, a
join moves one fragment per object it touches, the ideal (``tests/ec/test_ec_placement.py``).

Targets are named: the name, not the address, is hashed, so a target replaced on another port or
host under the same name keeps its objects.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import attrs

from kvext.keys import KeyLike, wire_key

OBJECT_ID_LENGTH = 16
_PERSON = b"gpucache-ec"


def object_id(key: KeyLike) -> bytes:
    """The 16-byte id of ``key``'s value: its fragments' key on every target, and what is placed.

    Derived from the user key's wire key (which keeps str and bytes keys apart); a fragment also
    carries the full user key, so a collision reads as "not found", never as another value.
    """
    return hashlib.blake2b(wire_key(key), digest_size=OBJECT_ID_LENGTH, person=_PERSON).digest()


@attrs.frozen
class Member:
    """A target as placement sees it: a stable name and a weight (say, its capacity in GiB)."""

    name: str
    weight: float = 1.0

    def __attrs_post_init__(self) -> None:
        if not self.weight > 0 or not math.isfinite(self.weight):
            raise ValueError(f"target {self.name!r}: weight must be positive, not {self.weight}")


def score(oid: bytes, member: Member) -> float:
    """The member's rendezvous score for ``oid``; higher wins."""
    digest = hashlib.blake2b(
        oid + member.name.encode(), digest_size=8, person=b"gpucache-hrw"
    ).digest()
    u = (int.from_bytes(digest, "little") + 0.5) / 2.0**64  # strictly inside (0, 1)
    return -member.weight / math.log(u)


def rank(oid: bytes, members: Iterable[Member]) -> list[Member]:
    """Every member, best first, for ``oid`` (ties broken by name, so the order is total)."""
    return sorted(members, key=lambda m: (-score(oid, m), m.name))


def place(oid: bytes, members: Sequence[Member], n: int) -> list[Member]:
    """The ``n`` distinct members that hold ``oid`` (fewer if there are fewer members)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    return rank(oid, members)[:n]
