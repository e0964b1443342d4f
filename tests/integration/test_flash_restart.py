"""A flash-backed target process: clean restart, SIGKILL during a stream of Stores, device refusal.

Keys are never rewritten and each value is derived from its key, so after a restart every listed key
must read back exactly (KVClient.get also checks the full key in the framing header), and every
Store acknowledged before the kill must be listed (the device is large enough never to evict).
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.testing import RunningTarget, spawn_target

pytestmark = pytest.mark.anyio

FLASH_ARGS = ("--flash-size", "96MiB", "--max-value-size", "1MiB", "--dram", "8MiB")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def value_for(key: bytes) -> bytes:
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    rng = random.Random(seed)
    return rng.randbytes(rng.choice((100, 5000, 70_000, 300_000)))


def flash_target(path: Path) -> object:
    return spawn_target("--flash", str(path), *FLASH_ARGS)


async def read_back(running: RunningTarget) -> list[bytes]:
    async with KVClient.connect(running.address, running.nqn) as kv:
        listed = await kv.list(max_keys=4000)
        for key in listed:
            assert await kv.get(key) == value_for(key)
    return listed


async def test_clean_restart_serves_every_value(tmp_path: Path) -> None:
    device = tmp_path / "flash.img"
    keys = [f"key-{i}".encode() for i in range(120)]
    with spawn_target("--flash", str(device), *FLASH_ARGS) as running:
        async with KVClient.connect(running.address, running.nqn) as kv:
            await kv.put_many((key, value_for(key)) for key in keys)
            assert await kv.get(keys[0]) == value_for(keys[0])
    # spawn_target stops the target with SIGTERM: a clean shutdown that checkpoints the index.
    log = tmp_path / "second.log"
    with spawn_target("--flash", str(device), *FLASH_ARGS, log_path=log) as running:
        assert sorted(await read_back(running)) == sorted(keys)
    assert "checkpoint" in log.read_text()


async def test_sigkill_during_stores_loses_nothing_acknowledged(tmp_path: Path) -> None:
    device = tmp_path / "flash.img"
    acked: set[bytes] = set()
    attempted: set[bytes] = set()
    with spawn_target("--flash", str(device), *FLASH_ARGS) as running:
        assert running.process is not None
        enough = anyio.Event()
        async with KVClient.connect(running.address, running.nqn) as kv:
            kv.timeout = 5.0

            async def writer(w: int) -> None:
                for i in range(100_000):
                    key = f"w{w}-{i}".encode()
                    attempted.add(key)
                    try:
                        await kv.put(key, value_for(key))
                    except Exception:
                        return  # the target is gone
                    acked.add(key)
                    if len(acked) >= 150:
                        enough.set()

            async with anyio.create_task_group() as tg:
                for w in range(6):
                    tg.start_soon(writer, w)
                await enough.wait()
                running.process.kill()  # SIGKILL, with Stores in flight
                running.process.wait()
                tg.cancel_scope.cancel()
    killed_at = len(acked)
    log = tmp_path / "restart.log"
    with spawn_target("--flash", str(device), *FLASH_ARGS, log_path=log) as running:
        listed = set(await read_back(running))
    assert "full scan" in log.read_text()  # never shut down cleanly: no checkpoint
    assert acked <= listed, f"{len(acked - listed)} acknowledged Stores lost"
    assert listed <= attempted
    assert killed_at >= 150


def test_check_flash_and_refusing_a_foreign_device(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.img"
    foreign.write_bytes(b"\x7fELF" + bytes(200_000))
    with pytest.raises(RuntimeError, match="flash-format"), spawn_target("--flash", str(foreign)):
        pass
    assert foreign.read_bytes()[:4] == b"\x7fELF"
    result = subprocess.run(
        [sys.executable, "-m", "nvmeof.cli", "check-flash", str(foreign)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "something else" in result.stdout
