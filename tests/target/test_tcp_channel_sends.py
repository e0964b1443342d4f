"""How a controller's TCP channel batches what it sends: a receive that brings many commands is
answered in slices (the host works on the first completions while the rest are served), and
every completion still goes out, in order, exactly once."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

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

    async def recv_into(self, view: memoryview, *, timeout: float = math.inf) -> int:
        if not self._incoming:
            return 0
        chunk = self._incoming.pop(0)
        assert len(chunk) <= len(view)
        view[: len(chunk)] = chunk
        return len(chunk)

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        self.sends.append(b"".join(bytes(b) for b in buffers))

    async def aclose(self) -> None:
        pass


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


async def test_a_large_batch_is_answered_in_slices() -> None:
    sends = await _serve([list(range(32))])
    assert [cid for send in sends for cid in send] == list(range(32))
    assert len(sends) == 32 // COMPLETIONS_PER_SEND
    assert all(len(send) == COMPLETIONS_PER_SEND for send in sends)


async def test_a_small_batch_goes_out_in_one_send() -> None:
    sends = await _serve([[1, 2, 3], [4]])
    assert sends == [[1, 2, 3], [4]]


async def test_a_batch_that_does_not_divide_evenly_loses_nothing() -> None:
    n = 3 * COMPLETIONS_PER_SEND + 3
    sends = await _serve([list(range(n))])
    assert [cid for send in sends for cid in send] == list(range(n))
    assert [len(send) for send in sends] == [COMPLETIONS_PER_SEND] * 3 + [3]
