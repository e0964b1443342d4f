"""KV Stores of megabytes in the command capsule (no R2T round trip): the value lands straight in
the engine's pooled buffer and is kept there; a Store the engine refuses still gets its NVMe
status, and RDMA, which posts a receive buffer per queue entry, keeps its small capsules."""

from __future__ import annotations

import os

import pytest

from kvext.client import KVClient
from kvext.namespace import KeyValueNamespace
from kvext.spec import KvStatus, kv_status, store_command
from nvmeof.target.subsystem import (
    RDMA_IN_CAPSULE_DATA_SIZE,
    Target,
    TargetLimits,
    transfer_size_for,
)
from nvmeof.testing import make_kv_target, serve_target

pytestmark = pytest.mark.anyio

IN_CAPSULE = (8 << 20) + 4096
MAX_VALUE = 8 << 20


def _target_and_namespace(max_value: int = MAX_VALUE) -> tuple[Target, KeyValueNamespace]:
    limits = TargetLimits(
        max_transfer_size=transfer_size_for(max_value), in_capsule_data_size=IN_CAPSULE
    )
    target = make_kv_target(capacity=256 << 20, max_value_length=max_value, limits=limits)
    ns = next(iter(target.subsystems.values())).namespaces[1]
    assert isinstance(ns, KeyValueNamespace)
    return target, ns


async def test_megabyte_stores_travel_in_the_capsule_into_pooled_buffers() -> None:
    target, ns = _target_and_namespace()
    allocated: list[int] = []
    allocate = ns.allocate_in_capsule

    def recording(sqe: memoryview, size: int) -> bytearray | memoryview:
        allocated.append(size)
        return allocate(sqe, size)

    ns.allocate_in_capsule = recording  # type: ignore[method-assign]
    values = [os.urandom(4 << 20) for _ in range(3)]
    async with (
        serve_target(target) as running,
        KVClient.connect(running.address, running.nqn, queue_depth=8) as kv,
    ):
        channel = kv.controller.io_queues[0].channel
        assert channel.max_in_capsule_data == IN_CAPSULE
        for round_ in range(4):
            for i, value in enumerate(values):
                await kv.put(f"k{i}", value[round_:] + value[:round_])
        for i, value in enumerate(values):
            assert await kv.get(f"k{i}") == value[3:] + value[:3]
    assert len(allocated) == 12
    assert all(size > 4 << 20 for size in allocated)
    # Overwritten values went back to the pool and later Stores landed in them.
    assert ns.engine.pool.stats.reused > 0  # type: ignore[attr-defined]


async def test_an_oversized_in_capsule_store_gets_its_status_and_the_queue_goes_on() -> None:
    target, ns = _target_and_namespace(max_value=1 << 20)
    async with (
        serve_target(target) as running,
        KVClient.connect(running.address, running.nqn) as kv,
    ):
        too_big = 2 << 20
        completion = await kv.controller.execute_io(
            store_command(kv.nsid, b"big", too_big),
            out=[bytes(too_big)],
            check=False,
        )
        assert completion.status == kv_status(KvStatus.INVALID_VALUE_SIZE)
        await kv.put("small", b"still here")
        assert await kv.get("small") == b"still here"
    assert ns.engine.used_bytes > 0


def test_rdma_keeps_its_capsules_small() -> None:
    limits = TargetLimits(in_capsule_data_size=IN_CAPSULE)
    assert limits.in_capsule_data_size_for("tcp") == IN_CAPSULE
    assert limits.in_capsule_data_size_for("rdma") == RDMA_IN_CAPSULE_DATA_SIZE
    assert TargetLimits(in_capsule_data_size=4096).in_capsule_data_size_for("rdma") == 4096
