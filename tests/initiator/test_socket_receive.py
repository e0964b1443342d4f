"""``AsyncSocket.recv_into(..., at_least=n)``: bytes the peer is sure to send are waited for and
taken in one receive (SO_RCVLOWAT), not segment by segment; a peer that sends fewer and stalls,
or closes, still gets what it sent delivered."""

from __future__ import annotations

import socket

import anyio
import anyio.lowlevel
import pytest

from nvmeof.transport.sockets import AsyncSocket

pytestmark = pytest.mark.anyio

PAYLOAD = 96 * 1024


async def test_a_promised_payload_comes_in_one_receive(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = tcp_pair
    sock = AsyncSocket(receiver)
    data = bytes(range(256)) * (PAYLOAD // 256)
    sender.sendall(data[: PAYLOAD // 2])
    buf = bytearray(PAYLOAD)
    got: list[int] = []

    async def receive() -> None:
        at_least = PAYLOAD if not got else 1
        with anyio.fail_after(10):  # a hang guard, not a timing check
            got.append(await sock.recv_into(memoryview(buf), at_least=at_least))

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()  # the receive is waiting on half of it
        sender.sendall(data[PAYLOAD // 2 :])
    assert got == [PAYLOAD]
    assert buf == data

    # The next plain receive waits for any byte again, not for the last payload's mark.
    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        sender.sendall(b"hello")
    assert got == [PAYLOAD, 5]


async def test_a_peer_that_stalls_short_of_its_promise_still_gets_its_bytes_through(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = tcp_pair
    sock = AsyncSocket(receiver)
    sender.sendall(b"x" * 10)
    buf = bytearray(PAYLOAD)
    assert await sock.recv_into(memoryview(buf), at_least=PAYLOAD, timeout=0.2) == 10
    with pytest.raises(TimeoutError):  # nothing at all for the timeout: a stall
        await sock.recv_into(memoryview(buf), at_least=PAYLOAD, timeout=0.2)


async def test_a_peer_that_closes_short_of_its_promise_is_read_to_the_end(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = tcp_pair
    sock = AsyncSocket(receiver)
    buf = bytearray(PAYLOAD)

    async def close_soon() -> None:
        await anyio.lowlevel.checkpoint()
        sender.sendall(b"y" * 10)
        sender.shutdown(socket.SHUT_WR)

    async with anyio.create_task_group() as tg:
        tg.start_soon(close_soon)
        assert await sock.recv_into(memoryview(buf), at_least=PAYLOAD) == 10
    assert await sock.recv_into(memoryview(buf), at_least=PAYLOAD) == 0
