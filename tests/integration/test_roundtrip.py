"""1,000 random keys, values log-uniform from 1 byte to 32 MiB, through a real target process.

4 I/O queues with 32 commands in flight each, header and data digests off and on, asyncio and trio.
"""

from __future__ import annotations

import math
import random

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.errors import KeyNotFound
from nvmeof.testing import RunningTarget, spawn_target

KEYS = 1000
MAX_VALUE = 32 << 20
QUEUES = 4
DEPTH = 32
POOL = 64 << 20


@pytest.fixture(scope="module")
def pool() -> memoryview:
    return memoryview(random.Random(1234).randbytes(POOL))


@pytest.fixture
def target() -> RunningTarget:
    with spawn_target("--capacity", "6GiB", "--max-value-size", "33MiB") as running:
        yield running


def _plan(seed: int) -> list[tuple[bytes | str, int, int]]:
    rng = random.Random(seed)
    plan: list[tuple[bytes | str, int, int]] = []
    for i in range(KEYS):
        size = min(MAX_VALUE, int(math.exp(rng.uniform(0, math.log(MAX_VALUE)))))
        offset = rng.randrange(0, POOL - size + 1)
        # A mix of raw 1-16 byte keys and long/str keys that travel hashed.
        key: bytes | str = f"k{i}".encode() if i % 3 else f"layer-{i % 80}/chunk-{i}/token-hash"
        plan.append((key, size, offset))
    return plan


async def _run_workers(count: int, jobs: list[int], work: object) -> None:
    it = iter(jobs)

    async def worker() -> None:
        for j in it:
            await work(j)  # type: ignore[operator]

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(worker)


@pytest.mark.anyio
@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
async def test_thousand_random_values_round_trip(
    target: RunningTarget, pool: memoryview, digests: bool
) -> None:
    plan = _plan(seed=7 + digests)
    async with KVClient.connect(
        target.address,
        target.nqn,
        io_queues=QUEUES,
        queue_depth=DEPTH,
        header_digest=digests,
        data_digest=digests,
    ) as kv:
        assert len(kv.controller.io_queues) == QUEUES

        async def put(i: int) -> None:
            key, size, offset = plan[i]
            await kv.put(key, pool[offset : offset + size])

        async def get(i: int) -> None:
            key, size, offset = plan[i]
            if i % 2:
                out = bytearray(size)
                assert await kv.get(key, out=out) is out
                got: bytes | bytearray = out
            else:
                got = await kv.get(key)
            assert len(got) == size, f"{key!r}: {len(got)} bytes, stored {size}"
            assert got == pool[offset : offset + size], f"{key!r}: value differs"

        await _run_workers(QUEUES * DEPTH, list(range(KEYS)), put)
        peaks = [q.peak_in_flight for q in kv.controller.io_queues]
        await _run_workers(QUEUES * DEPTH, list(range(KEYS)), get)
        # Every queue had many commands on the wire at once, never more than its depth.
        assert all(DEPTH // 2 <= p <= DEPTH for p in peaks), peaks

        listed = await kv.list(max_keys=2 * KEYS)
        assert len(listed) == KEYS
        for key, _, _ in plan[:10]:
            await kv.delete(key)
            assert not await kv.exists(key)
            with pytest.raises(KeyNotFound):
                await kv.get(key)
