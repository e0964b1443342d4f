"""The real NVMe/TCP target and initiator over simulated links, with faults made on demand.

Everything runs in virtual time (``run_virtual``: trio's MockClock), so timeouts of seconds cost
nothing and every figure below is logic in virtual time, not a wall-clock measurement.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from kvext.client import KVClient
from nvmeof.errors import CommandTimeout, ConnectionLost, NvmeofError
from nvmeof.initiator.controller import Controller
from nvmeof.target.subsystem import Target
from nvmeof.tcp.pdu import PduType
from nvmeof.testing import TEST_NQN, make_kv_target
from simulator.clock import run_virtual
from simulator.fabric import Fabric, LinkSpec, Segment, Verdict
from simulator.protocol import NVME_PORT, serve_target_node
from simulator.stream import SimNetwork

VALUE = bytes(range(256)) * 4096  # 1 MiB: beyond in-capsule data, so it goes by R2T + H2CData
ADDRESS = ("t0", NVME_PORT)


def _run(
    body: Callable[[SimNetwork, list[Target]], Awaitable[None]],
    *,
    seed: int = 0,
    spec: LinkSpec | None = None,
) -> None:
    """Serve a DRAM KV target on node t0 and run ``body`` with a network to reach it from h0."""

    async def main() -> None:
        fabric = Fabric(seed, spec or LinkSpec(latency=20e-6, bandwidth=1e9))
        network = SimNetwork(fabric)
        targets: list[Target] = []

        def make() -> Target:
            targets.append(make_kv_target())
            return targets[-1]

        async with anyio.create_task_group() as tg:
            await tg.start(serve_target_node, network, "t0", make)
            await body(network, targets)
            tg.cancel_scope.cancel()

    run_virtual(main, seed=seed)


def _connect(network: SimNetwork, **options: Any) -> AbstractAsyncContextManager[KVClient]:
    return KVClient.connect(ADDRESS, TEST_NQN, connector=network.connector("h0"), **options)


async def _fresh_exists(network: SimNetwork, key: bytes) -> bool:
    async with _connect(network) as kv:
        return bool(await kv.exists(key))


def test_round_trip_takes_the_time_the_link_model_says() -> None:
    async def body(network: SimNetwork, targets: list[Target]) -> None:
        async with _connect(network) as kv:
            await kv.put(b"k", VALUE)
            out = bytearray(len(VALUE))
            start = anyio.current_time()
            await kv.get(b"k", out=out)  # one Retrieve straight into ``out``
            elapsed = anyio.current_time() - start
            assert out == VALUE
        # Command capsule out, 1 MiB (+ framing) back at 1 GB/s: two latencies and the transfer.
        floor = 2 * 20e-6 + len(VALUE) / 1e9
        assert floor <= elapsed <= floor * 1.05

    _run(body)


def test_link_cut_mid_h2cdata_fails_the_put_and_the_target_lives_on() -> None:
    cut: list[Segment] = []

    def route(segment: Segment, _: object) -> Verdict | None:
        if segment.src == "h0" and segment.data[0] == PduType.H2C_DATA and not cut:
            cut.append(segment)
            return Verdict(reset_after=len(segment.data) // 2)
        return None

    async def body(network: SimNetwork, targets: list[Target]) -> None:
        async with _connect(network) as kv:
            network.fabric.link("h0", "t0").route = route
            with pytest.raises(ConnectionLost):
                await kv.put(b"torn", VALUE)
            network.fabric.link("h0", "t0").route = None
        assert cut, "the put never sent H2CData"
        assert not await _fresh_exists(network, b"torn")  # half a value is never stored
        assert len(targets) == 1  # the same target process served both connections

    _run(body)


def test_reset_during_r2t_fails_the_put() -> None:
    seen: list[int] = []

    def route(segment: Segment, _: object) -> Verdict | None:
        if segment.src == "t0" and segment.data[0] == PduType.R2T:
            seen.append(segment.offset)
            return Verdict(reset_after=4)  # in the middle of the R2T's common header
        return None

    async def body(network: SimNetwork, targets: list[Target]) -> None:
        async with _connect(network) as kv:
            network.fabric.link("h0", "t0").route = route
            with pytest.raises(ConnectionLost):
                await kv.put(b"r2t", VALUE)
            network.fabric.link("h0", "t0").route = None
        assert len(seen) == 1
        assert not await _fresh_exists(network, b"r2t")

    _run(body)


def test_stalled_target_times_out_in_virtual_time() -> None:
    async def body(network: SimNetwork, targets: list[Target]) -> None:
        link = network.fabric.link("h0", "t0")
        async with Controller.connect(
            ADDRESS, TEST_NQN, connector=network.connector("h0"), kato_ms=0
        ) as ctrl:
            kv = KVClient(ctrl, timeout=2.0)
            await kv.put(b"k", b"v")
            link.stall()
            start = anyio.current_time()
            with pytest.raises(CommandTimeout):
                await kv.get(b"k")
            assert 2.0 <= anyio.current_time() - start < 2.0 + 1e-6
            link.resume()
            # The late C2HData of the command given up on is fatal to that queue, by design
            # (``HostConnection.forget``); the target itself is fine.
            with pytest.raises(ConnectionLost):
                await kv.get(b"k")
        assert await _fresh_exists(network, b"k")

    _run(body)


def test_cut_link_fails_both_ends_and_refuses_until_restored() -> None:
    async def body(network: SimNetwork, targets: list[Target]) -> None:
        link = network.fabric.link("h0", "t0")
        async with _connect(network) as kv:
            await kv.put(b"k", b"v")
            link.cut()
            with pytest.raises(ConnectionLost):
                await kv.get(b"k")
            with pytest.raises(ConnectionLost):
                await _fresh_exists(network, b"k")
            link.restore()
        assert await _fresh_exists(network, b"k")  # the target kept its data

    _run(body)


def test_partition_and_heal() -> None:
    async def body(network: SimNetwork, targets: list[Target]) -> None:
        fabric = network.fabric
        fabric.partition(["h0"], ["t0"])
        with pytest.raises(ConnectionLost):
            await _fresh_exists(network, b"k")
        fabric.heal()
        assert not await _fresh_exists(network, b"k")

    _run(body)


def test_target_crash_and_restart_loses_dram() -> None:
    async def body(network: SimNetwork, targets: list[Target]) -> None:
        node = network.fabric.node("t0")
        async with _connect(network) as kv:
            await kv.put(b"k", b"v")
            node.crash()
            with pytest.raises(NvmeofError):
                await kv.get(b"k")
        with pytest.raises(ConnectionLost):
            await _fresh_exists(network, b"k")
        node.restart()
        await anyio.lowlevel.checkpoint()
        assert not await _fresh_exists(network, b"k")
        assert len(targets) == 2

    _run(body)


def _trace(seed: int, loss: float) -> list[tuple[float, str, int, int]]:
    trace: list[tuple[float, str, int, int]] = []

    def route(segment: Segment, _: object) -> Verdict | None:
        trace.append((segment.time, segment.src, segment.connection, len(segment.data)))
        return None

    async def body(network: SimNetwork, targets: list[Target]) -> None:
        network.fabric.link("h0", "t0").route = route
        async with _connect(network, io_queues=2, queue_depth=4) as kv:

            async def worker(w: int) -> None:
                for i in range(12):
                    size = 1 + (w * 7919 + i * 104729) % 300_000
                    await kv.put(f"{w}-{i}".encode(), VALUE[:size])
                    assert await kv.get(f"{w}-{(i * 5) % (i + 1)}".encode()) is not None

            async with anyio.create_task_group() as tg:
                for w in range(4):
                    tg.start_soon(worker, w)
        trace.append((anyio.current_time(), "end", 0, 0))

    _run(body, seed=seed, spec=LinkSpec(latency=20e-6, bandwidth=1e9, loss=loss, jitter=5e-6))
    return trace


def test_same_seed_same_wire_trace() -> None:
    first = _trace(seed=3, loss=0.01)
    assert first == _trace(seed=3, loss=0.01)
    assert first != _trace(seed=4, loss=0.01)


@pytest.mark.anyio
async def test_sim_streams_also_run_on_both_backends_in_real_time() -> None:
    network = SimNetwork(Fabric(0, LinkSpec(latency=1e-6, bandwidth=10e9)))
    async with anyio.create_task_group() as tg:
        await tg.start(serve_target_node, network, "t0", make_kv_target)
        async with _connect(network) as kv:
            await kv.put(b"k", VALUE)
            assert await kv.get(b"k") == VALUE
        tg.cancel_scope.cancel()
