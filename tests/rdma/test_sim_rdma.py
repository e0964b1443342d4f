"""The NVMe/RDMA channels end to end over simulated verbs (virtual time, deterministic).

The real ``TargetServer``/``QueueSession`` behind ``serve_rdma`` and the real ``Controller`` with
``transport="rdma"``: KV put/get and block I/O, keyed SGL READ (host-to-controller) and WRITE
(controller-to-host) paths, in-capsule data, Send with Invalidate, a remote access error, and the
RDMA-CM reject codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.errors import ConnectionLost, KeyNotFound, NvmeofError
from nvmeof.initiator.block import BlockNamespaceClient
from nvmeof.initiator.controller import Controller
from nvmeof.rdma.cm import ConnectRequestData, RejectData, RejectStatus
from nvmeof.testing import TEST_NQN, make_block_target, make_kv_target
from nvmeof.transport.rdma import RdmaHostChannel
from nvmeof.transport.verbs import Access, ConnectionRejected
from simulator.clock import run_virtual
from simulator.rdma import SimConnector, SimRdma

from .conftest import HOST_NODE, PORT, TARGET_NODE, make_rdma, rdma_target

TIMEOUT = 20.0


def run(test: Callable[[SimRdma], Awaitable[None]], **kwargs: Any) -> None:
    rdma = make_rdma(**kwargs)

    async def main() -> None:
        with anyio.fail_after(TIMEOUT):
            await test(rdma)

    run_virtual(main)


def connect(rdma: SimRdma, **options: Any) -> Any:
    options.setdefault("rdma_connector", rdma.connector(HOST_NODE))
    return Controller.connect(
        (TARGET_NODE, PORT), TEST_NQN, transport="rdma", kato_ms=0, timeout=5.0, **options
    )


def io_channel(ctrl: Controller) -> RdmaHostChannel:
    channel = ctrl.io_queues[0].channel
    assert isinstance(channel, RdmaHostChannel)
    return channel


def test_kv_put_get_in_capsule_and_keyed() -> None:
    async def test(rdma: SimRdma) -> None:
        async with rdma_target(rdma, make_kv_target()), connect(rdma) as ctrl:
            assert ctrl.identify is not None
            assert ctrl.identify.sgls & 0x4  # keyed SGL data blocks over RDMA
            kv = KVClient(ctrl)
            small = b"s" * 100  # in-capsule (IOCCSZ)
            large = bytes(range(256)) * 1024  # 256 KiB: keyed SGL, the target RDMA-READs it
            await kv.put(b"small", small)
            await kv.put(b"large", large)
            assert bytes(await kv.get(b"small")) == small
            out = bytearray(len(large))
            got = await kv.get(b"large", out=out)
            assert bytes(got) == large
            assert await kv.exists(b"large")
            await kv.delete(b"large")
            with pytest.raises(KeyNotFound):
                await kv.get(b"large")

    run(test)


def test_reused_buffer_is_registered_once() -> None:
    async def test(rdma: SimRdma) -> None:
        async with rdma_target(rdma, make_kv_target()), connect(rdma) as ctrl:
            kv = KVClient(ctrl, framing=False)
            value = bytearray(b"v" * 65536)
            out = bytearray(65536)
            cache = io_channel(ctrl).cache
            for i in range(4):
                value[0] = i
                await kv.put(b"k%d" % i, value)
                await kv.get(b"k%d" % i, out=out)
                assert out == value
            assert len(cache) == 2  # value and out, each registered once
            assert cache.misses == 2
            assert cache.hits == 6

    run(test)


def test_block_io_over_rdma() -> None:
    async def test(rdma: SimRdma) -> None:
        async with rdma_target(rdma, make_block_target()), connect(rdma, io_queues=2) as ctrl:
            block = BlockNamespaceClient(ctrl)
            await block.identify()
            data = bytes((i * 7) & 0xFF for i in range(512 * 64))
            await block.write(8, data)
            assert bytes(await block.read(8, 64)) == data
            assert bytes(await block.read(0, 1)) == bytes(512)
            # many commands in flight on both queues at once
            async with anyio.create_task_group() as tg:
                for lba in range(0, 256, 8):
                    tg.start_soon(block.write, 1000 + lba, bytes([lba]) * 4096)
            for lba in range(0, 256, 8):
                assert bytes(await block.read(1000 + lba, 8)) == bytes([lba]) * 4096

    run(test)


def test_send_with_invalidate_when_the_host_asks() -> None:
    async def test(rdma: SimRdma) -> None:
        async with (
            rdma_target(rdma, make_kv_target()),
            connect(rdma, rdma_invalidate=True) as ctrl,
        ):
            kv = KVClient(ctrl)
            value = b"x" * 100_000
            await kv.put(b"key", value)
            assert bytes(await kv.get(b"key")) == value
            channel = io_channel(ctrl)
            assert channel.invalidate
            assert channel.invalidated >= 2  # the put's and the get's keys, invalidated remotely
            assert len(channel.cache) == 0  # per-command registrations, not cached ones

    run(test)


def test_invalidate_not_offered_by_the_device_falls_back_to_plain_keys() -> None:
    async def test(rdma: SimRdma) -> None:
        async with (
            rdma_target(rdma, make_kv_target()),
            connect(rdma, rdma_invalidate=True) as ctrl,
        ):
            kv = KVClient(ctrl)
            await kv.put(b"key", b"y" * 50_000)
            assert bytes(await kv.get(b"key")) == b"y" * 50_000
            assert not io_channel(ctrl).invalidate

    run(test, remote_invalidate=False)


def test_polling_mode() -> None:
    async def test(rdma: SimRdma) -> None:
        connector = SimConnector(rdma, HOST_NODE, poll_mode=True)
        async with (
            rdma_target(rdma, make_kv_target()),
            connect(rdma, rdma_connector=connector) as ctrl,
        ):
            kv = KVClient(ctrl)
            await kv.put(b"p", b"q" * 20_000)
            assert bytes(await kv.get(b"p")) == b"q" * 20_000

    run(test)


def test_remote_access_error_fails_the_command_and_only_that_queue() -> None:
    async def test(rdma: SimRdma) -> None:
        async with rdma_target(rdma, make_kv_target()) as server:
            async with connect(rdma) as ctrl:
                kv = KVClient(ctrl, framing=False)
                await kv.put(b"key", b"z" * 32768)
                out = bytearray(32768)
                channel = io_channel(ctrl)
                stale = channel.cache.lookup(out, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
                stale.mr.close()  # deregistered behind the cache's back: the rkey is dead
                with pytest.raises(ConnectionLost):
                    await kv.get(b"key", out=out)
                assert out == bytearray(32768)  # nothing landed
            # the target keeps serving: a new controller works
            async with connect(rdma) as ctrl2:
                kv2 = KVClient(ctrl2, framing=False)
                assert bytes(await kv2.get(b"key")) == b"z" * 32768
            assert server.connections >= 0

    run(test)


def test_target_disconnect_fails_host_commands() -> None:
    async def test(rdma: SimRdma) -> None:
        async with rdma_target(rdma, make_kv_target()) as _server:
            ctrl = await connect(rdma)
            kv = KVClient(ctrl)
            await kv.put(b"a", b"b")
        # the target (and its queues) are gone
        with pytest.raises(NvmeofError):
            await kv.get(b"a")
        await ctrl.close(shutdown=False)

    run(test)


@pytest.mark.parametrize(
    ("request_data", "status"),
    [
        (ConnectRequestData(0, 32, 31, recfmt=1).pack(), RejectStatus.INVALID_RECFMT),
        (ConnectRequestData(0, 32, 31).pack()[:20], RejectStatus.INVALID_PRIVATE_DATA_LENGTH),
        (ConnectRequestData(1000, 32, 31).pack(), RejectStatus.INVALID_QID),
        (ConnectRequestData(1, 32, 5000).pack(), RejectStatus.INVALID_HSQSIZE),
        (ConnectRequestData(1, 0, 31).pack(), RejectStatus.INVALID_HRQSIZE),
    ],
)
def test_connect_reject_codes(request_data: bytes, status: RejectStatus) -> None:
    async def test(rdma: SimRdma) -> None:
        async with rdma_target(rdma, make_kv_target()):
            connector = rdma.connector(HOST_NODE)
            with pytest.raises(ConnectionRejected) as exc:
                await connector(TARGET_NODE, PORT, request_data, send_depth=32, recv_depth=32)
            assert RejectData.unpack(exc.value.private_data).status == status

    run(test)


def test_no_listener_is_refused_and_reject_reason_is_reported() -> None:
    async def test(rdma: SimRdma) -> None:
        with pytest.raises(ConnectionRejected, match="refused"):
            await connect(rdma)
        async with rdma_target(rdma, make_kv_target()):
            with pytest.raises(ConnectionRejected, match="INVALID_HSQSIZE"):
                await RdmaHostChannel.connect(
                    TARGET_NODE, PORT, connector=rdma.connector(HOST_NODE), qid=1, depth=5000
                )

    run(test)


def test_runs_are_deterministic() -> None:
    def once() -> float:
        rdma = make_rdma(seed=3)

        async def main() -> float:
            async with rdma_target(rdma, make_kv_target()), connect(rdma) as ctrl:
                kv = KVClient(ctrl)
                for i in range(8):
                    await kv.put(b"k%d" % i, bytes([i]) * 10_000)
                return anyio.current_time()

        return run_virtual(main)

    assert once() == once()
