"""``gpucache target --workers 2``: one sharded KV namespace served by two worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kvext.client import KVClient
from kvext.keys import wire_key
from kvext.sharding import RoutedKVClient, ShardMap, _merge, owner
from nvmeof.errors import KeyNotFound
from nvmeof.target.subsystem import Target
from nvmeof.tcp.connection import ControllerConnection
from nvmeof.tcp.events import ConnectionParams
from nvmeof.testing import RunningTarget, spawn_target


@pytest.fixture(scope="module")
def sharded() -> Iterator[RunningTarget]:
    with spawn_target("--workers", "2", "--capacity", "256MiB", "--no-discovery") as running:
        yield running


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _value(i: int) -> bytes:
    return f"value-{i}-".encode() * (1 + i % 97)


# --- the pieces, without processes ---------------------------------------------------------------
def test_shard_map_round_trips_through_the_identify_page() -> None:
    page = bytearray(4096)
    assert ShardMap.unpack(page) is None  # an unsharded target says nothing
    shard = ShardMap(workers=3, index=2, ports=(4421, 4422, 4423))
    shard.pack_into(page)
    assert ShardMap.unpack(page) == shard


def test_merge_keeps_key_order_and_drops_duplicates() -> None:
    assert _merge([[b"a", b"c"], [b"b", b"c", b"d"]], 3) == [b"a", b"b", b"c"]


def test_worker_residue_classes_of_controller_ids() -> None:
    from nvmeof.target.subsystem import Subsystem

    subsystem = Subsystem(nqn="nqn.2024-01.io.example:x")
    for index in range(3):
        target = Target()
        target.restrict_cntlids(index, 3)
        ids = [target.allocate_cntlid(subsystem) for _ in range(5)]
        assert all(cntlid % 3 == index and cntlid > 0 for cntlid in ids)


def test_resumed_controller_connection_reads_commands_at_once() -> None:
    params = ConnectionParams(
        header_digest=False, data_digest=False, cpda=0, hpda=0, maxh2cdata=65536, maxr2t=0
    )
    conn = ControllerConnection.resumed(params)
    assert conn.params == params
    conn.send_response(bytes(16))  # READY: no ICReq needed before sending
    assert conn.data_to_send()


# --- a real two-worker target --------------------------------------------------------------------
@pytest.mark.anyio
async def test_two_clients_routed_and_forwarded(sharded: RunningTarget) -> None:
    """A routing client and a plain one (whose controller lives on one worker, so half of its
    keys are forwarded) store 1000 keys together; each reads every value back."""
    keys = [f"key-{i}" for i in range(1000)]
    async with (
        RoutedKVClient.connect(sharded.address, sharded.nqn, io_queues=2) as routed,
        KVClient.connect(sharded.address, sharded.nqn, io_queues=2) as plain,
    ):
        assert routed.shard_map is not None
        assert routed.shard_map.workers == 2
        owners = {owner(wire_key(k), 2) for k in keys[1::2]}
        assert owners == {0, 1}  # the plain client's keys live on both workers: some forwarded
        async with anyio.create_task_group() as tg:
            evens = [(k, _value(i)) for i, k in enumerate(keys) if i % 2 == 0]
            odds = [(k, _value(i)) for i, k in enumerate(keys) if i % 2]
            tg.start_soon(routed.put_many, evens)
            tg.start_soon(plain.put_many, odds)
        from_routed = await routed.get_many(keys)
        from_plain = await plain.get_many(keys)
        expected = [_value(i) for i in range(len(keys))]
        assert from_routed == expected
        assert from_plain == expected

        listed = await plain.list(max_keys=2000)
        assert sorted(listed) == listed
        assert set(listed) >= {wire_key(k) for k in keys}
        assert await routed.list(max_keys=2000) == listed

        # Exist, Delete and a missing key, forwarded and not.
        for key in keys[:10]:
            assert await plain.exists(key)
            await plain.delete(key)
            assert not await routed.exists(key)
            with pytest.raises(KeyNotFound):
                await plain.get(key)
        await plain.delete(keys[0])  # deleting a missing key succeeds (EDNEK 0), forwarded too
        await plain.put(keys[0], b"again", must_not_exist=True)
        assert await routed.get(keys[0]) == b"again"


@pytest.mark.anyio
async def test_large_values_cross_workers(sharded: RunningTarget) -> None:
    big = os.urandom(3 << 20)
    async with KVClient.connect(sharded.address, sharded.nqn) as plain:
        names = [f"big-{i}" for i in range(4)]
        for name in names:
            await plain.put(name, big)
        for name in names:
            assert await plain.get(name) == big


def test_clean_shutdown_stops_every_worker() -> None:
    with spawn_target("--workers", "2", "--no-discovery") as running:
        proc = running.process
        assert proc is not None
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not [pid for pid in workers if _alive(pid)]


def test_a_worker_crash_stops_the_target_loudly() -> None:
    log = Path(tempfile.mkdtemp()) / "target.log"
    with spawn_target("--workers", "2", "--no-discovery", log_path=log) as running:
        proc = running.process
        assert proc is not None
        workers = _children(proc.pid)
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(20) == 1
        assert not [pid for pid in workers if _alive(pid)]
    assert "worker 1" in log.read_text()


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return False
        if status == "Z":
            return False
        time.sleep(0.05)
    return True


def test_workers_refuse_what_they_cannot_share() -> None:
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "nvmeof.cli", "target", "--workers", "2", "--malloc", "1MiB"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1
    assert b"--malloc" in out.stderr
