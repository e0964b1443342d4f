"""``gpucache target -m``: SPDK's CPU mask forms, and a real target process pinned by it."""

from __future__ import annotations

import os

import pytest

from nvmeof.cpumask import parse_cpumask
from nvmeof.testing import spawn_target


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0x1", {0}), ("0x6", {1, 2}), ("5", {0, 2}), ("[0]", {0}), ("[0,2-3]", {0, 2, 3})],
)
def test_masks_and_lists(text: str, cpus: set[int]) -> None:
    assert parse_cpumask(text) == cpus


@pytest.mark.parametrize("text", ["0x0", "[]", "[3-1]", "zz", "-1"])
def test_bad_masks_are_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- int() and ours say different things
        parse_cpumask(text)


def test_the_target_process_runs_on_its_mask() -> None:
    cpu = max(os.sched_getaffinity(0))
    with spawn_target("--cpumask", f"[{cpu}]") as target:
        assert target.process is not None
        assert os.sched_getaffinity(target.process.pid) == {cpu}


def test_a_cpu_that_is_not_there_stops_the_target_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="not available"), spawn_target("--cpumask", "[4095]"):
        pass
