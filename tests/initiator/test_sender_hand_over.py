"""A host's sending task hands what others queued meanwhile to another task after its round,
instead of draining for them until the queue happens to be empty (under steady load: never, and
its caller waits long after its own command completed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest

from nvmeof.tcp.connection import HostConnection
from nvmeof.transport.base import Buffer
from nvmeof.transport.tcp import _Sender
from tests.tcp.test_tcp_connection import make_sqe, ready_host

pytestmark = pytest.mark.anyio


class _GatedStream:
    """``send_all`` waits until the test opens the gate; records what each call sent."""

    peer = "gated"

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.sent: list[int] = []

    async def recv_into(
        self, view: memoryview, *, timeout: float = math.inf, at_least: int = 1
    ) -> int:
        raise AssertionError("not used")

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        await self.gate.wait()
        self.sent.append(sum(len(b) for b in buffers))

    async def aclose(self) -> None:
        pass


def _queue_command(host: HostConnection, cid: int) -> None:
    host.send_command(make_sqe(cid), read_into=[memoryview(bytearray(16))])


async def test_the_sender_hands_over_what_was_queued_during_its_send() -> None:
    host = ready_host()
    stream = _GatedStream()
    asked: list[bool] = []

    def hand_over() -> bool:
        asked.append(True)
        return True

    sender = _Sender(stream, host, hand_over)
    _queue_command(host, 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.flush)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        _queue_command(host, 2)  # another caller's command, queued while the send is under way
        await sender.flush()  # that caller returns at once: a send is under way
        stream.gate.set()
    assert stream.sent == [72]  # its own round only
    assert asked == [True]
    assert host.has_data_to_send  # command 2 is left for the task that was asked
    await sender.flush()  # that task's turn
    assert stream.sent == [72, 72]
    assert not host.has_data_to_send


async def test_with_nobody_to_hand_over_to_the_sender_drains_everything() -> None:
    host = ready_host()
    stream = _GatedStream()
    sender = _Sender(stream, host, lambda: False)
    _queue_command(host, 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.flush)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        _queue_command(host, 2)
        stream.gate.set()
    assert stream.sent == [72, 72]
    assert not host.has_data_to_send
