"""A peer that stops reading: the send that cannot go out ends as a lost connection, in time,
instead of hanging the command forever (commands' own timeouts cover only the wait for their
completion)."""

from __future__ import annotations

import socket

import anyio
import pytest

from nvmeof.errors import ConnectionLost
from nvmeof.transport.sockets import AsyncSocket

pytestmark = pytest.mark.anyio


async def test_a_send_nobody_drains_loses_the_connection() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        sock = AsyncSocket(ours)
        sock.send_stall_timeout = 0.2
        chunk = bytes(64 << 20)  # far beyond both socket buffers: the send stalls part way
        with anyio.fail_after(30), pytest.raises(ConnectionLost, match="accepted no data"):
            await sock.send_all([chunk])
        assert sock.closed


async def test_a_slow_reader_is_not_a_stall() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    sock = AsyncSocket(ours)
    sock.send_stall_timeout = 5.0
    data = bytes(range(256)) * (64 << 10)  # 16 MiB: far beyond the socket buffers
    received = bytearray()

    async def drain() -> None:
        buf = bytearray(1 << 16)
        while len(received) < len(data):
            await anyio.wait_readable(theirs)
            n = theirs.recv_into(buf)
            received.extend(buf[:n])
            await anyio.sleep(0.001)

    with theirs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await sock.send_all([data])
        await sock.aclose()
    assert received == data
