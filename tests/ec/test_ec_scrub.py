"""A corrupted fragment: get still returns the right value, scrub finds and rebuilds it; and the
cluster's KVClient-like API (tensors, out=, exists, delete, list, apply_map moves).

The fragment is corrupted by overwriting it on its target through a raw ``KVClient`` put of
altered bytes under the fragment's key (these targets keep values in DRAM; see
``test_ec_flash_corruption`` for corruption on disk)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import numpy as np
import pytest

from ec.cluster import ClusterKV
from ec.clustermap import ClusterMap, TargetEntry
from ec.codec import Scheme, parse_fragment
from ec.placement import object_id
from kvext.client import KVClient
from nvmeof.testing import RunningTarget, make_kv_target, serve_target

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def _targets(n: int) -> AsyncIterator[list[RunningTarget]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                serve_target(make_kv_target(capacity=256 << 20, max_value_length=16 << 20))
            )
            for _ in range(n)
        ]


def _map(targets: list[RunningTarget]) -> ClusterMap:
    entries = tuple(
        TargetEntry(f"t{i}", t.host, t.port, subnqn=t.nqn) for i, t in enumerate(targets)
    )
    return ClusterMap(targets=entries)


@pytest.mark.parametrize("size", [1000, 3 << 20])  # replicated, coded
async def test_corrupt_fragment_reads_right_and_scrub_rebuilds_it(size: int) -> None:
    value = os.urandom(size)
    async with _targets(6) as targets, ClusterKV.open(_map(targets)) as cluster:
        result = await cluster.put("victim", value)
        assert result.stored == result.width
        oid = object_id("victim")
        holder = cluster.placement(oid)[0]  # rank 0: always asked first
        target = targets[int(holder.name[1:])]
        async with KVClient.connect(target.address, target.nqn, framing=False) as raw:
            stored = bytearray(await raw.get(oid))
            stored[-1] ^= 0xFF  # one payload bit pattern changed; headers intact
            await raw.put(oid, stored)

        assert await cluster.get("victim") == value
        report = await cluster.scrub()
        assert report.corrupt == 1
        assert report.rebuilt == 1
        assert report.unrecoverable == []
        async with KVClient.connect(target.address, target.nqn, framing=False) as raw:
            repaired = parse_fragment(await raw.get(oid), verify=True)  # checksum holds again
        expected_scheme = Scheme.REPLICA if size < cluster.code.replicate_below else Scheme.CODED
        assert repaired.header.scheme is expected_scheme
        assert (await cluster.scrub()).corrupt == 0


async def test_same_api_as_kvclient() -> None:
    async with _targets(6) as targets, ClusterKV.open(_map(targets)) as cluster:
        arr = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
        await cluster.put("tensor", arr)
        back = await cluster.get("tensor")
        assert isinstance(back, np.ndarray)
        np.testing.assert_array_equal(back, arr)
        out = np.empty_like(arr)
        assert await cluster.get("tensor", out=out) is out
        np.testing.assert_array_equal(out, arr)
        await cluster.put(b"raw", b"abc")
        assert await cluster.exists(b"raw")
        assert not await cluster.exists(b"nope")
        with pytest.raises(KeyError):
            await cluster.get(b"nope")
        assert sorted(map(str, await cluster.list())) == sorted(["tensor", "b'raw'"])
        await cluster.put(b"raw", b"overwritten, and now much longer" * 4000)
        assert await cluster.get(b"raw") == b"overwritten, and now much longer" * 4000
        await cluster.delete(b"raw")
        assert not await cluster.exists(b"raw")


async def test_a_joining_target_gets_its_share_by_repair() -> None:
    async with _targets(8) as targets, ClusterKV.open(_map(targets[:7])) as cluster:
        values = {f"k{i}": os.urandom(100_000) for i in range(60)}
        for key, value in values.items():
            await cluster.put(key, value)
        await cluster.apply_map(_map(targets))
        report = await cluster.repair()
        # Each object whose set now includes t7 moves exactly one fragment there, none else.
        expected = sum(
            1 for key in values if "t7" in {t.name for t in cluster.placement(object_id(key))}
        )
        assert expected > 0
        assert report.moved == expected
        assert report.deleted == expected
        assert report.rebuilt == 0
        for key, value in values.items():
            assert await cluster.get(key) == value
