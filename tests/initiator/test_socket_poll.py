"""``AsyncSocket`` polls before it sleeps: a receive that finds nothing tries again, yielding
between tries, for ``poll`` seconds; bytes that come meanwhile are read with no readiness wait.
Past the poll it sleeps as before, and a poll can be cancelled like any wait."""

from __future__ import annotations

import socket

import anyio
import anyio.lowlevel
import pytest

from nvmeof.transport import sockets
from nvmeof.transport.sockets import AsyncSocket, set_default_poll

pytestmark = pytest.mark.anyio


class _Sleeps:
    """Counts the readiness waits of one socket."""

    def __init__(self, sock: AsyncSocket) -> None:
        self.count = 0
        self.asleep = anyio.Event()
        original = sock._wait_readable

        async def counted(timeout: float, due: int) -> None:
            self.count += 1
            self.asleep.set()
            await original(timeout, due)

        sock._wait_readable = counted  # type: ignore[method-assign]


async def _receive_after_sender_yields(
    sock: AsyncSocket, sender: socket.socket, data: bytes, yields: int
) -> bytes:
    buf = bytearray(64)
    got: list[int] = []

    async def receive() -> None:
        with anyio.fail_after(10):  # a hang guard, not a timing check
            got.append(await sock.recv_into(memoryview(buf)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        for _ in range(yields):
            await anyio.lowlevel.checkpoint()  # the receive found nothing and is polling
        sender.sendall(data)
    return bytes(buf[: got[0]])


@pytest.mark.parametrize(("poll", "sleeps_expected"), [(30.0, 0), (0.0, 1)])
async def test_an_answer_during_the_poll_is_read_without_sleeping(
    tcp_pair: tuple[socket.socket, socket.socket], poll: float, sleeps_expected: int
) -> None:
    """With a poll, the receive takes the answer on a retry; without, it sleeps on readiness."""
    sender, receiver = tcp_pair
    sock = AsyncSocket(receiver, poll=poll)
    sleeps = _Sleeps(sock)
    assert await _receive_after_sender_yields(sock, sender, b"ready", 5) == b"ready"
    assert sleeps.count == sleeps_expected


async def test_past_the_poll_the_receive_sleeps_and_still_gets_the_bytes(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = tcp_pair
    sock = AsyncSocket(receiver, poll=1e-6)
    sleeps = _Sleeps(sock)
    buf = bytearray(16)
    got: list[int] = []

    async def receive() -> None:
        with anyio.fail_after(10):
            got.append(await sock.recv_into(memoryview(buf)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        await sleeps.asleep.wait()  # the poll ran out: the receive is asleep on readiness
        sender.sendall(b"late")
    assert bytes(buf[: got[0]]) == b"late"
    assert sleeps.count == 1


async def test_a_poll_is_cancellable(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    _, receiver = tcp_pair
    sock = AsyncSocket(receiver, poll=3600.0)
    sleeps = _Sleeps(sock)
    with anyio.move_on_after(0.05) as scope:
        await sock.recv_into(memoryview(bytearray(16)))
    assert scope.cancelled_caught
    assert sleeps.count == 0  # it was cancelled while polling, never slept


async def test_end_of_stream_during_the_poll_reads_as_zero(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = tcp_pair
    sock = AsyncSocket(receiver, poll=30.0)
    got: list[int] = []

    async def receive() -> None:
        with anyio.fail_after(10):
            got.append(await sock.recv_into(memoryview(bytearray(16))))

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        sender.shutdown(socket.SHUT_WR)
    assert got == [0]


def test_the_default_poll_applies_to_sockets_made_after_it_is_set(
    tcp_pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sockets, "POLL", sockets.POLL)  # restored after the test
    set_default_poll(0.0005)
    assert AsyncSocket(tcp_pair[0]).poll == 0.0005
    assert AsyncSocket(tcp_pair[1], poll=0).poll == 0
    with pytest.raises(ValueError, match="negative"):
        set_default_poll(-1)


def test_the_environment_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUCACHE_POLL_US", "50")
    assert sockets._poll_from_environment() == 50e-6
    monkeypatch.setenv("GPUCACHE_POLL_US", "-3")
    assert sockets._poll_from_environment() == 0
    monkeypatch.setenv("GPUCACHE_POLL_US", "fast")
    with pytest.raises(ValueError, match="GPUCACHE_POLL_US"):
        sockets._poll_from_environment()
