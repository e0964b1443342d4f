"""``gpucache stats`` against a target process: the counters of each KV namespace, per tier.

The flash-backed target admits a value to DRAM when it is read back from flash (the default), so
the first get of a key is a DRAM miss and a flash hit, the second a DRAM hit; a get of a key that
was never stored misses both tiers. The counts below are exactly the operations the test made.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.errors import KeyNotFound
from nvmeof.target.rpc_client import RpcCallError, rpc_call
from nvmeof.testing import RunningTarget, spawn_target

STORED = {f"key-{i}".encode(): bytes([i]) * (3000 + 1500 * i) for i in range(10)}
MISSING = [f"absent-{i}".encode() for i in range(4)]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A Unix socket path must stay under 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="gpucache-stats-", dir="/tmp") as tmp:
        yield Path(tmp)


def gpucache_stats(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nvmeof.cli", "stats", "-r", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def exercise(running: RunningTarget) -> None:
    async with KVClient.connect(running.address, running.nqn) as kv:
        for key, value in STORED.items():
            await kv.put(key, value)
        for _ in range(2):
            for key, value in STORED.items():
                out = bytearray(len(value))
                await kv.get(key, out=out)  # one Retrieve each
                assert out == value
        for key in MISSING:
            with pytest.raises(KeyNotFound):
                await kv.get(key, out=bytearray(16))


def table_rows(text: str) -> dict[str, list[str]]:
    """Tier name -> its row's cells, from the table under the namespace's title line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["tier", "hits"])
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def test_stats_counts_hits_misses_and_bytes_per_tier(short_dir: Path) -> None:
    sock = short_dir / "rpc.sock"
    device = short_dir / "flash.img"
    args = ("--flash", str(device), "--flash-size", "64MiB", "--max-value-size", "1MiB")
    args += ("--dram", "8MiB", "-r", str(sock), "--no-discovery")
    with spawn_target(*args) as running:
        anyio.run(exercise, running)
        done = gpucache_stats(sock, "--json")
        assert done.returncode == 0, done.stderr
        text = gpucache_stats(sock)
        assert text.returncode == 0, text.stderr

    (entry,) = json.loads(done.stdout)
    assert (entry["nqn"], entry["nsid"], entry["name"]) == (running.nqn, 1, "kv0")
    assert entry["bdev_name"] is None  # the command line's namespace is no bdev
    tiers: dict[str, dict[str, Any]] = {t["tier"]: t for t in entry["tiers"]}
    assert list(tiers) == ["dram", "flash", "total"]
    n, missing = len(STORED), len(MISSING)
    stored_bytes = sum(map(len, STORED.values()))

    total, dram, flash = tiers["total"], tiers["dram"], tiers["flash"]
    assert (total["hits"], total["misses"]) == (2 * n, missing)
    assert (dram["hits"], dram["misses"]) == (n, n + missing)  # first reads went on to flash
    assert (flash["hits"], flash["misses"]) == (n, missing)
    assert total["hit_ratio"] == pytest.approx(2 * n / (2 * n + missing))
    assert total["bytes_in"] >= stored_bytes
    assert flash["bytes_in"] >= stored_bytes
    assert dram["bytes_in"] >= stored_bytes  # every value was admitted on its first read
    assert total["bytes_out"] >= 2 * stored_bytes
    assert flash["bytes_out"] >= stored_bytes
    assert dram["bytes_out"] >= stored_bytes
    for tier in tiers.values():
        assert tier["evictions"] == 0
        assert 0 < tier["used_bytes"] <= tier["capacity_bytes"]
    assert dram["crc_dropped"] is None
    assert flash["crc_dropped"] == total["crc_dropped"] == 0
    assert entry["engine"]["engine"] == "tiered"
    assert entry["engine"]["flash"]["path"] == str(device)

    title = text.stdout.splitlines()[0]
    assert title.startswith(f"{running.nqn} nsid 1 (kv0): tiered, flash {device}")
    rows = table_rows(text.stdout)
    assert list(rows) == ["dram", "flash", "total"]
    assert rows["total"][1:5] == [str(2 * n), str(missing), f"{2 * n / (2 * n + missing):.3f}", "0"]
    assert rows["dram"][1:3] == [str(n), str(n + missing)]
    assert rows["flash"][1:3] == [str(n), str(missing)]
    assert rows["flash"][-1] == "0"
    assert rows["dram"][-1] == "-"


def test_stats_of_dram_namespace_and_bdevs_outside_subsystems(short_dir: Path) -> None:
    sock = short_dir / "rpc.sock"
    with spawn_target("--capacity", "16MiB", "-r", str(sock), "--no-discovery") as running:
        rpc_call(str(sock), "bdev_kvmalloc_create", {"name": "KvSpare", "capacity_bytes": 1 << 20})

        async def miss_twice() -> None:
            async with KVClient.connect(running.address, running.nqn) as kv:
                await kv.put(b"k", b"v" * 100)
                await kv.get(b"k", out=bytearray(100))
                for _ in range(2):
                    with pytest.raises(KeyNotFound):
                        await kv.get(b"nope", out=bytearray(100))

        anyio.run(miss_twice)
        both = json.loads(gpucache_stats(sock, "--json").stdout)
        one = gpucache_stats(sock, "--json", "-b", "kv0")
        unknown = gpucache_stats(sock, "-b", "no-such")
        with pytest.raises(RpcCallError):
            rpc_call(str(sock), "bdev_kv_get_stats", {"bogus": 1})

    assert [(e["name"], e["nqn"]) for e in both] == [("kv0", running.nqn), ("KvSpare", None)]
    (kv0,) = json.loads(one.stdout)
    (tier,) = kv0["tiers"]
    assert (tier["tier"], tier["hits"], tier["misses"], tier["crc_dropped"]) == ("dram", 1, 2, None)
    assert tier["bytes_in"] >= 100
    assert tier["capacity_bytes"] == 16 << 20
    spare = both[1]["tiers"][0]
    assert (spare["hits"], spare["misses"], spare["capacity_bytes"]) == (0, 0, 1 << 20)
    assert unknown.returncode == 1
    assert "no-such" not in unknown.stdout
