"""``bench.loadgen`` (the lean client of ``bench.scaling``) against a real ``--workers 2`` target.

Correctness only, never speed: commands complete, every status is checked (a failed command
fails the run), each key goes to the worker that owns it, and values read back are the ones
stored (checked by the generator's own CRC and, independently, by ``RoutedKVClient``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from bench import loadgen, scaling
from kvext.sharding import RoutedKVClient, owner
from nvmeof.testing import RunningTarget, spawn_target

NQN = "nqn.2024-01.io.gpucache:loadgen-test"
SMALL = 4096  # in the capsule
LARGE = 300_000  # pulled with R2T/H2CData, read back in several C2HData PDUs


@pytest.fixture(scope="module")
def sharded() -> Iterator[RunningTarget]:
    args = ("--workers", "2", "--capacity", "256MiB", "--no-discovery")
    with spawn_target(*args, nqn=NQN) as running:
        yield running


def _read_back(target: RunningTarget, keys: list[bytes]) -> list[bytes]:
    async def read() -> list[bytes]:
        async with RoutedKVClient.connect(target.address, NQN, framing=False) as kv:
            return [bytes(await kv.get(key)) for key in keys]

    return anyio.run(read)


@pytest.mark.parametrize("size", [SMALL, LARGE, 0])
def test_puts_and_gets_complete_on_the_owning_worker_with_the_right_values(
    sharded: RunningTarget, size: int
) -> None:
    with loadgen.Client.connect(sharded.host, sharded.port, NQN, queues=2, depth=8) as client:
        assert client.workers == 2
        assert sorted({w for w, _, _ in client.sockets}) == [0, 1]  # 2 queues on each worker
        assert len(client.sockets) == 4
        value = loadgen.random_value(size, 12)
        streams = client.streams(f"t{size:x}", size, 12, value, verify=True)
        assert sum(len(s.keys) for s in streams) == 12
        for (worker, _, _), stream in zip(client.sockets, streams, strict=True):
            assert stream.keys
            assert all(owner(key, 2) == worker for key in stream.keys)
        # at least one full round: every slot's command is sent before the end is checked
        puts, took = loadgen.run_op(streams, "put", 0.0)
        assert puts >= 12
        assert took > 0
        gets, _ = loadgen.run_op(streams, "get", 0.0)  # CRC-checked against each slot's value
        assert gets >= 12
        assert all(s.outstanding == 0 for s in streams)
        keys = [key for s in streams for key in s.keys]
        expected = [bytes(v) for s in streams for v in s.values]
    assert _read_back(sharded, keys) == expected


@pytest.mark.parametrize("verify", [True, False])  # without: large values dropped uncopied
def test_run_reports_every_cell(sharded: RunningTarget, verify: bool) -> None:
    results = loadgen.run(
        sharded.address, NQN, sizes=[SMALL, LARGE], seconds=0.2, inflight=6, verify=verify
    )
    assert list(results) == [f"{op} {size}" for size in (SMALL, LARGE) for op in ("put", "get")]
    for cell in results.values():
        assert cell["ops"] >= 6
        assert cell["seconds"] > 0


def test_a_failed_command_fails_the_run(sharded: RunningTarget) -> None:
    with loadgen.Client.connect(*sharded.address, NQN) as client:
        value = loadgen.random_value(SMALL, 4)
        streams = client.streams("missing", SMALL, 4, value)
        with pytest.raises(loadgen.LoadError, match="KEY_DOES_NOT_EXIST"):
            loadgen.run_op(streams, "get", 0.0)


def test_a_wrong_value_read_back_fails_a_verified_run(sharded: RunningTarget) -> None:
    with loadgen.Client.connect(*sharded.address, NQN) as client:
        stored = loadgen.random_value(SMALL, 4)
        loadgen.run_op(client.streams("wrong", SMALL, 4, stored), "put", 0.0)
        other = loadgen.random_value(SMALL, 4)
        streams = client.streams("wrong", SMALL, 4, other, verify=True)
        with pytest.raises(loadgen.LoadError, match="differs"):
            loadgen.run_op(streams, "get", 0.0)


def test_a_get_of_another_size_fails_the_run(sharded: RunningTarget) -> None:
    with loadgen.Client.connect(*sharded.address, NQN) as client:
        value = loadgen.random_value(SMALL, 2)
        loadgen.run_op(client.streams("sz", SMALL, 2, value), "put", 0.0)
        # the same keys, read into buffers of half the size
        old = client.streams("sz", SMALL, 2, value)
        streams = [
            loadgen.Stream(s.sock, link, s.keys, value, SMALL // 2, 8192)
            for s, (_, _, link) in zip(old, client.sockets, strict=True)
        ]
        with pytest.raises(loadgen.LoadError, match="value size"):
            loadgen.run_op(streams, "get", 0.0)


@pytest.mark.parametrize("client", ["lean", "routed"])
def test_scaling_prints_each_cell_and_the_ratio(
    client: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    json_path = tmp_path / "scaling.json"
    argv = ["--workers", "2", "--clients", "1", "--sizes", "4KiB", "--seconds", "0.3"]
    argv += ["--gap", "0.2", "--repeat", "1", "--inflight", "4", "--capacity", "256MiB"]
    argv += ["--client", client, "--json", str(json_path), "--pin"]
    if client == "routed":
        argv.append("--no-ceiling")
    assert scaling.main(argv) == 0
    out = capsys.readouterr().out
    assert f"1 {client} client processes" in out
    assert ("machine: 2 CPU-bound processes do x" in out) == (client == "lean")
    for cell in ("put 4KiB", "get 4KiB"):
        row = next(line for line in out.splitlines() if line.strip().startswith(cell + ":"))
        assert re.search(r"\| x\d+\.\d\d(  \(disturbed\))?$", row), row
    runs = json.loads(json_path.read_text())
    assert len(runs) == 1
    for workers in ("1", "2"):
        for cell in ("put 4096", "get 4096"):
            assert runs[0][workers][cell]["ops_per_s"] > 0
            assert runs[0][workers][cell]["client_cores_busy"] > 0
    assert ("machine_ceiling" in runs[0]) == (client == "lean")


def test_command_line_prints_each_cell_as_json(
    sharded: RunningTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"{sharded.host}:{sharded.port}", "--nqn", NQN, "--sizes", "4KiB", "--seconds", "0.1"]
    assert loadgen.main([*argv, "--inflight", "4", "--prefix", "cli", "--verify"]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert list(cells) == ["put 4096", "get 4096"]
    assert all(c["ops"] >= 4 and c["ops_per_s"] > 0 for c in cells.values())
