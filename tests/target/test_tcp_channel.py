"""A controller's TCP channel: a receive that brings many commands is answered in slices (the host
works on the first completions while the rest are served), every completion still going out, in
order, exactly once; and in-capsule data the host sends unasked is bounded by not reading on
while too much of it waits for its commands to complete."""

from __future__ import annotations

import math
from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest

from nvmeof.errors import ConnectionLost
from nvmeof.spec.completion import Completion
from nvmeof.tcp.events import ConnectionParams
from nvmeof.tcp.pdu import PduType
from nvmeof.transport.base import Buffer, Request
from nvmeof.transport.tcp import COMPLETIONS_PER_SEND, TcpControllerChannel
from tests.tcp.test_tcp_connection import capsule

pytestmark = pytest.mark.anyio

_PARAMS = ConnectionParams(
    header_digest=False, data_digest=False, cpda=0, hpda=0, maxh2cdata=1 << 20, maxr2t=1
)


class _ScriptedStream:
    """Hands out ``incoming`` one receive at a time, then end of stream; records each send."""

    peer = "scripted"

    def __init__(self, incoming: list[bytes]) -> None:
        self._incoming = incoming
        self.sends: list[bytes] = []
        self.receives = 0
        self.closed = False

    async def recv_into(
        self, view: memoryview, *, timeout: float = math.inf, at_least: int = 1
    ) -> int:
        self.receives += 1
        if self.closed:
            raise ConnectionLost("scripted stream closed")
        if not self._incoming:
            return 0
        chunk = self._incoming.pop(0)
        assert len(chunk) <= len(view)
        view[: len(chunk)] = chunk
        return len(chunk)

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        self.sends.append(b"".join(bytes(b) for b in buffers))

    async def aclose(self) -> None:
        self.closed = True


async def _settle() -> None:
    """Let the channel run until it waits (the scripted stream itself never does)."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


def _responses(sent: bytes) -> list[int]:
    """CIDs of the CapsuleResp PDUs in ``sent``."""
    cids = []
    while sent:
        assert sent[0] == PduType.CAPSULE_RESP
        plen = int.from_bytes(sent[4:8], "little")
        cids.append(int.from_bytes(sent[8 + 12 : 8 + 14], "little"))
        sent = sent[plen:]
    return cids


async def _serve(batches: list[list[int]]) -> list[list[int]]:
    stream = _ScriptedStream([b"".join(capsule(cid) for cid in batch) for batch in batches])
    channel = TcpControllerChannel(stream, negotiated=_PARAMS)

    def answer(request: Request) -> None:  # as the queue answers a DRAM Retrieve: at once
        channel.complete_nowait(request, Completion(cid=request.command.cid))

    await channel.run(answer)
    return [_responses(sent) for sent in stream.sends]


async def test_a_large_batch_is_answered_in_growing_slices() -> None:
    # The first slice goes out early (the host starts on it), each next one twice as large.
    k = COMPLETIONS_PER_SEND
    sends = await _serve([list(range(7 * k))])
    assert [cid for send in sends for cid in send] == list(range(7 * k))
    assert [len(send) for send in sends] == [k, 2 * k, 4 * k]


async def test_a_small_batch_goes_out_in_one_send() -> None:
    sends = await _serve([[1, 2, 3], [4]])
    assert sends == [[1, 2, 3], [4]]


async def test_a_batch_that_does_not_fill_its_slices_loses_nothing() -> None:
    k = COMPLETIONS_PER_SEND
    n = 3 * k + 3
    sends = await _serve([list(range(n))])
    assert [cid for send in sends for cid in send] == list(range(n))
    assert [len(send) for send in sends] == [k, 2 * k, 3]


async def test_every_receive_starts_again_with_a_small_slice() -> None:
    k = COMPLETIONS_PER_SEND
    first, second = list(range(3 * k)), list(range(3 * k, 6 * k))
    sends = await _serve([first, second])
    assert [len(send) for send in sends] == [k, 2 * k, k, 2 * k]


async def test_in_capsule_data_beyond_the_budget_holds_reading_back() -> None:
    stream = _ScriptedStream([capsule(1, bytes(300)), capsule(2, bytes(10)), capsule(3)])
    channel = TcpControllerChannel(stream, negotiated=_PARAMS, in_capsule_budget=100)
    channel.set_max_in_capsule_data(4096)
    arrived: list[Request] = []

    def on_request(request: Request) -> None:
        arrived.append(request)
        if request.command.cid != 1:  # command 1 is left waiting: its 300 bytes stay held
            channel.complete_nowait(request, Completion(cid=request.command.cid))

    async with anyio.create_task_group() as tg:
        tg.start_soon(channel.run, on_request)
        await _settle()
        # 300 bytes wait for command 1: nothing more is read until it completes.
        assert [r.command.cid for r in arrived] == [1]
        assert stream.receives == 1
        channel.complete_nowait(arrived[0], Completion(cid=1))
        await _settle()
    # Command 2's 10 bytes fit the budget: reading went on to the end of the stream.
    assert [r.command.cid for r in arrived] == [1, 2, 3]
    assert _responses(b"".join(stream.sends)) == [1, 2, 3]


async def test_closing_a_connection_that_holds_back_for_room_ends_it() -> None:
    stream = _ScriptedStream([capsule(1, bytes(300)), capsule(2)])
    channel = TcpControllerChannel(stream, negotiated=_PARAMS, in_capsule_budget=100)
    channel.set_max_in_capsule_data(4096)
    arrived: list[Request] = []
    with anyio.fail_after(10):  # a hang guard, not a timing check
        async with anyio.create_task_group() as tg:
            tg.start_soon(channel.run, arrived.append)
            await _settle()
            await channel.aclose()  # e.g. keep-alive expired while command 1 still runs
    assert [r.command.cid for r in arrived] == [1]
