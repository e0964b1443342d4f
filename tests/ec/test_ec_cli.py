"""``gpucache cluster status|put|get|repair|scrub`` against a cluster file of spawned targets."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from ec.clustermap import ClusterMap, TargetEntry
from nvmeof.cli import main
from nvmeof.testing import TEST_NQN, spawn_target


def test_cluster_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.ExitStack() as stack:
        targets = [stack.enter_context(spawn_target()) for _ in range(6)]
        path = tmp_path / "cluster.json"
        ClusterMap(
            targets=tuple(
                TargetEntry(f"t{i}", t.host, t.port, subnqn=TEST_NQN) for i, t in enumerate(targets)
            )
        ).save(path)
        base = ["cluster", "--cluster", str(path)]
        assert main([*base, "status"]) == 0
        assert "6 of 6 targets up" in capsys.readouterr().out
        assert main([*base, "put", "greeting", "hello" * 30_000]) == 0
        assert "as 6 of 6 coded fragments" in capsys.readouterr().out
        assert main([*base, "get", "greeting"]) == 0
        assert capsys.readouterr().out == "hello" * 30_000
        proc = targets[2].process
        assert proc is not None
        proc.kill()
        proc.wait()
        assert main([*base, "get", "greeting"]) == 0
        assert capsys.readouterr().out == "hello" * 30_000
        assert main([*base, "status"]) == 0
        assert "5 of 6 targets up" in capsys.readouterr().out
        assert main([*base, "scrub"]) == 0
        assert "unrecoverable 0" in capsys.readouterr().out
        assert main([*base, "get", "missing"]) == 1
