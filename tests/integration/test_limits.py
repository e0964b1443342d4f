"""Resource limits: a slow or hostile peer cannot exhaust the target (TargetLimits)."""

from __future__ import annotations

import socket

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.target.subsystem import TargetLimits
from nvmeof.testing import make_kv_target, serve_target

pytestmark = pytest.mark.anyio


async def wait_closed(sock: socket.socket, timeout: float) -> bool:
    """True once the peer closed ``sock`` (EOF or reset) within ``timeout`` seconds."""
    sock.setblocking(False)
    with anyio.move_on_after(timeout):
        while True:
            await anyio.wait_readable(sock)
            try:
                if sock.recv(4096) == b"":
                    return True
            except ConnectionResetError:
                return True
            except BlockingIOError:
                pass
    return False


@pytest.mark.parametrize("stall", ["before-icreq-partial", "half-header-after-icreq"])
async def test_slowloris_peer_disconnected_others_keep_working(stall: str) -> None:
    limits = TargetLimits(header_timeout=0.5)
    target = make_kv_target(capacity=16 << 20, limits=limits)
    with anyio.fail_after(20):
        async with serve_target(target) as rt:
            with socket.create_connection(rt.address) as slow:
                if stall == "before-icreq-partial":
                    slow.sendall(bytes([0x00, 0x00, 128, 0]))  # 4 of ICReq's 8 CH bytes
                else:
                    icreq = bytearray(128)
                    icreq[0], icreq[2], icreq[4] = 0x00, 128, 128
                    slow.sendall(bytes(icreq))
                    await anyio.sleep(0.1)
                    slow.recv(128)  # ICResp
                    slow.sendall(bytes([0x04, 0x00, 72, 0]))  # half a CapsuleCmd header
                async with KVClient.connect(rt.address, rt.nqn, timeout=10.0) as good:
                    for i in range(5):  # a neighbour keeps working throughout
                        await good.put(f"k{i}", b"v" * 100)
                        assert await good.get(f"k{i}") == b"v" * 100
                    assert await wait_closed(slow, timeout=5.0)
                    await good.put("after", b"still serving")


async def test_idle_connected_peer_is_not_timed_out() -> None:
    """The header timeout is for stalls inside a PDU; an idle queue between PDUs stays."""
    limits = TargetLimits(header_timeout=0.3)
    target = make_kv_target(capacity=16 << 20, limits=limits)
    with anyio.fail_after(20):
        async with (
            serve_target(target) as rt,
            KVClient.connect(rt.address, rt.nqn, timeout=10.0, kato_ms=0) as client,
        ):
            await client.put("a", b"1")
            await anyio.sleep(1.0)
            assert await client.get("a") == b"1"


async def test_max_connections() -> None:
    limits = TargetLimits(max_connections=2)
    target = make_kv_target(capacity=16 << 20, limits=limits)
    with anyio.fail_after(20):
        async with serve_target(target) as rt:
            async with KVClient.connect(rt.address, rt.nqn, io_queues=1, timeout=5.0) as c:
                with socket.create_connection(rt.address) as extra:
                    assert await wait_closed(extra, timeout=5.0)
                await c.put("x", b"y")  # the two connections already held keep working
            # once those close, a new client fits again
            async with KVClient.connect(rt.address, rt.nqn, io_queues=1, timeout=5.0) as c:
                assert await c.get("x") == b"y"


async def test_in_flight_bytes_bounded_per_connection() -> None:
    """Many large stores at once on one queue: at most max_in_flight_bytes buffered at a time,
    and all of them complete."""
    limits = TargetLimits(max_in_flight_bytes=64 << 10)
    target = make_kv_target(capacity=64 << 20, limits=limits)
    with anyio.fail_after(30):
        async with (
            serve_target(target) as rt,
            KVClient.connect(rt.address, rt.nqn, io_queues=1, timeout=20.0) as c,
        ):
            values = {f"big{i}": bytes([i]) * (40 << 10) for i in range(16)}
            await c.put_many(values.items())
            got = await c.get_many(list(values))
            assert got == list(values.values())
