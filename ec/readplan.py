"""Which fragments a read still needs: the decision half of a get, with no I/O (sans-IO).

A get asks the object's placement set, best-ranked first, for its fragments; each answer is fed
in here (a fragment, "no such key", or "target unavailable") and the plan says how many more
targets to ask and when the read is done. The rules follow from the write quorum W (of n
fragments; replicas: W - k + 1 of m + 1):

- a coded value is decodable from k fragments of one generation. A put that reached its quorum
  left at most n - W older fragments, fewer than k, so an older generation never decodes in
  their place;
- a replicated value needs one copy, but one stale copy can survive a quorum overwrite, so a read
  waits for m + 2 - Wr answers from the replica ranks (a read quorum that meets every write
  quorum) and takes the newest generation among them;
- the key is absent once n - W + 1 targets said so (at least m + 2 - Wr of them replica
  ranks): a stored value would have been on one of them;
- anything else: ask more targets while any are left; then settle for the newest decodable
  generation seen (a degraded read), or report the key absent or the cluster unavailable.
"""

from __future__ import annotations

import enum

import attrs

from ec.codec import Fragment, Scheme


class ReadOutcome(enum.Enum):
    PENDING = "pending"
    FOUND = "found"
    ABSENT = "absent"
    UNAVAILABLE = "unavailable"


@attrs.define
class ReadPlan:
    """Answers in, decisions out, for reading one object from ``candidates`` ranked targets."""

    k: int
    m: int
    write_quorum: int
    candidates: int
    launched: int = 0
    in_flight: int = 0
    misses: int = 0
    replica_misses: int = 0
    replica_replies: int = 0
    unavailable: int = 0
    generations: dict[int, dict[int, Fragment]] = attrs.field(factory=dict)

    @property
    def replica_write_quorum(self) -> int:
        return max(1, min(self.m + 1, self.write_quorum - self.k + 1))

    @property
    def replica_read_quorum(self) -> int:
        return self.m + 2 - self.replica_write_quorum

    @property
    def absent_after(self) -> int:
        return self.k + self.m - self.write_quorum + 1

    def _is_replica_rank(self, rank: int) -> bool:
        return rank <= self.m

    # --- answers in -------------------------------------------------------------------------
    def launch(self) -> int:
        """Record one more read started; returns the rank to ask."""
        rank = self.launched
        self.launched += 1
        self.in_flight += 1
        return rank

    def on_fragment(self, rank: int, fragment: Fragment) -> None:
        self.in_flight -= 1
        if self._is_replica_rank(rank):
            self.replica_replies += 1
        group = self.generations.setdefault(fragment.header.generation, {})
        group.setdefault(fragment.index, fragment)

    def on_missing(self, rank: int) -> None:
        self.in_flight -= 1
        self.misses += 1
        if self._is_replica_rank(rank):
            self.replica_replies += 1
            self.replica_misses += 1

    def on_unavailable(self, rank: int) -> None:
        self.in_flight -= 1
        self.unavailable += 1

    # --- decisions out ----------------------------------------------------------------------
    @staticmethod
    def _decodable(group: dict[int, Fragment]) -> bool:
        first = next(iter(group.values()))
        if first.header.scheme is Scheme.REPLICA:
            return True
        return len(group) >= first.header.k

    def best(self) -> list[Fragment] | None:
        """The newest decodable generation's fragments (index order), if any."""
        for generation in sorted(self.generations, reverse=True):
            group = self.generations[generation]
            if self._decodable(group):
                return [group[i] for i in sorted(group)]
        return None

    def outcome(self) -> ReadOutcome:
        exhausted = self.in_flight == 0 and self.launched >= self.candidates
        if self.generations:
            newest = self.generations[max(self.generations)]
            first = next(iter(newest.values()))
            if self._decodable(newest) and (
                first.header.scheme is Scheme.CODED
                or self.replica_replies >= self.replica_read_quorum
            ):
                return ReadOutcome.FOUND
            if exhausted:
                return ReadOutcome.FOUND if self.best() is not None else ReadOutcome.UNAVAILABLE
            return ReadOutcome.PENDING
        if self.misses >= self.absent_after and self.replica_misses >= self.replica_read_quorum:
            return ReadOutcome.ABSENT
        if exhausted:
            return ReadOutcome.ABSENT if self.unavailable == 0 else ReadOutcome.UNAVAILABLE
        return ReadOutcome.PENDING

    def wanted(self) -> int:
        """How many more reads to start now (0 while enough are in flight, or none are left)."""
        if self.outcome() is not ReadOutcome.PENDING:
            return 0
        if self.generations:
            newest = self.generations[max(self.generations)]
            first = next(iter(newest.values()))
            if first.header.scheme is Scheme.CODED:
                need = first.header.k - len(newest)
            else:
                need = max(1, self.replica_read_quorum - self.replica_replies)
        else:
            need = self.k  # keep k asking until a fragment shows what the value is
        return max(0, min(need - self.in_flight, self.candidates - self.launched))
