"""``bench --compare`` times our cells and redis-py's interleaved, so both see the same machine."""

from __future__ import annotations

import pytest

from bench.kv_throughput import _paired_cells

pytestmark = pytest.mark.anyio


async def test_cells_alternate_in_slices_whose_order_swaps_each_round() -> None:
    events: list[str] = []

    async def ours(w: int, key: bytes) -> None:
        if not events or events[-1] != "ours":
            events.append("ours")

    async def theirs(w: int, key: bytes) -> None:
        if not events or events[-1] != "theirs":
            events.append("theirs")

    async def after_theirs() -> None:
        events.append("purge")

    keys = [b"k%d" % i for i in range(8)]
    mine, other = await _paired_cells(2, keys, 10.0, 64, ours, theirs, after_theirs)
    # Four slices a side, each capped at 64 // 4 commands: the op cap still bounds the cell.
    assert mine.ops == other.ops == 64
    # theirs | ours ours | theirs theirs | ours ours | theirs (adjacent slices of one side merge
    # in this log), a purge after every slice of theirs
    assert events == [
        "theirs", "purge", "ours", "theirs", "purge", "theirs", "purge", "ours", "theirs", "purge",
    ]  # fmt: skip
    assert mine.seconds > 0
    assert other.seconds > 0


async def test_a_cell_too_small_to_split_runs_once_a_side() -> None:
    counts = {"ours": 0, "theirs": 0}

    async def ours(w: int, key: bytes) -> None:
        counts["ours"] += 1

    async def theirs(w: int, key: bytes) -> None:
        counts["theirs"] += 1

    async def nothing() -> None:
        pass

    # 64 commands at 8 in flight (32 MiB values in a 2 GiB cell): under eight windows of 8 a
    # slice, so one slice a side, not four that each end with a drain.
    mine, other = await _paired_cells(8, [b"k"] * 8, 10.0, 64, ours, theirs, nothing)
    assert counts == {"ours": 64, "theirs": 64}
    assert mine.ops == other.ops == 64
