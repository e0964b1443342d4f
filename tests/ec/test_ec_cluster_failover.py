"""Six real target processes, 500 values of 1 KiB..32 MiB coded 4+2: lose two targets, read
everything, replace them with empty ones, repair, lose two others, read everything again."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import anyio
import pytest

from ec.cluster import ClusterKV
from ec.clustermap import ClusterMap, TargetEntry
from ec.link import LinkOptions, LinkState
from nvmeof.testing import TEST_NQN, RunningTarget, spawn_target

pytestmark = pytest.mark.anyio

TARGET_ARGS = ("--capacity", "1GiB", "--max-value-size", "16MiB")
COUNT = 500


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # one backend: this is the long end-to-end run


def _sizes(rng: random.Random) -> list[int]:
    """Log-uniform 1 KiB..1 MiB, plus a few large values up to 32 MiB (one is exactly 32 MiB)."""
    large = [2 << 20, 3 << 20, 4 << 20, 5 << 20, 7 << 20, 9 << 20, 12 << 20, 16 << 20, 32 << 20]
    small = [
        int(math.exp(rng.uniform(math.log(1024), math.log(1 << 20))))
        for _ in range(COUNT - len(large))
    ]
    sizes = small + large
    rng.shuffle(sizes)
    return sizes


def _map(targets: dict[str, RunningTarget]) -> ClusterMap:
    return ClusterMap(
        targets=tuple(
            TargetEntry(name, t.host, t.port, subnqn=TEST_NQN) for name, t in targets.items()
        ),
        k=4,
        m=2,
    )


@contextlib.contextmanager
def _spawn(stack: contextlib.ExitStack) -> Iterator[RunningTarget]:
    yield stack.enter_context(spawn_target(*TARGET_ARGS))


async def _read_all(cluster: ClusterKV, values: dict[str, bytes]) -> None:
    limiter = anyio.Semaphore(16)
    bad: list[str] = []

    async def one(key: str, expected: bytes) -> None:
        async with limiter:
            if len(expected) % 3 == 0:  # some land in a caller's buffer
                out = bytearray(len(expected))
                got = await cluster.get(key, out=out)
                assert got is out
                data = bytes(out)
            else:
                data = await cluster.get(key)
            if data != expected:
                bad.append(key)

    async with anyio.create_task_group() as tg:
        for key, expected in values.items():
            tg.start_soon(one, key, expected)
    assert not bad, f"{len(bad)} values came back wrong: {bad[:5]}"


async def test_lose_two_replace_repair_lose_two_more() -> None:
    rng = random.Random(2024)
    values = {f"kv-{i}": rng.randbytes(size) for i, size in enumerate(_sizes(rng))}
    options = LinkOptions(connect_timeout=2.0, command_timeout=30.0, backoff_initial=0.2)
    with contextlib.ExitStack() as stack:
        targets = {f"t{i}": stack.enter_context(spawn_target(*TARGET_ARGS)) for i in range(6)}
        async with ClusterKV.open(_map(targets), options=options) as cluster:
            limiter = anyio.Semaphore(16)

            async def put(key: str, value: bytes) -> None:
                async with limiter:
                    result = await cluster.put(key, value)
                    assert not result.degraded

            async with anyio.create_task_group() as tg:
                for key, value in values.items():
                    tg.start_soon(put, key, value)
            await _read_all(cluster, values)

            # Two targets die: every value still reads, bit-exact.
            for name in ("t1", "t4"):
                process = targets[name].process
                assert process is not None
                process.kill()
                process.wait()
            await _read_all(cluster, values)
            states = {s.name: s.state for s in cluster.status()}
            assert states["t1"] is LinkState.DOWN
            assert states["t4"] is LinkState.DOWN

            # A put while two are down stores k fragments: degraded, not failed (quorum 4 here).
            cluster.write_quorum = 4
            result = await cluster.put("written-while-degraded", b"x" * 300_000)
            assert result.degraded
            assert result.stored == 4
            values["written-while-degraded"] = b"x" * 300_000
            cluster.write_quorum = 5

            # Empty targets take their names (on new ports); repair refills them.
            for name in ("t1", "t4"):
                targets[name] = stack.enter_context(spawn_target(*TARGET_ARGS))
            await cluster.apply_map(_map(targets))
            report = await cluster.repair()
            assert report.unrecoverable == []
            assert report.incomplete == 0
            assert report.skipped_targets == []
            assert report.objects == len(values)
            assert report.rebuilt > 0
            assert report.moved == 0
            again = await cluster.repair()
            assert again.healthy == len(values)
            assert again.rebuilt == 0

            # Two other targets die: everything still reads.
            for name in ("t0", "t2"):
                process = targets[name].process
                assert process is not None
                process.kill()
                process.wait()
            await _read_all(cluster, values)
