"""The SUCCESS-flag optimisation: with SQ flow control disabled at Connect (CATTR bit 2), a read
that returns data and no DW0 completes with its last C2HData PDU, with no CapsuleResp after it."""

from __future__ import annotations

import os

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.initiator.block import BlockNamespaceClient
from nvmeof.initiator.controller import Controller
from nvmeof.testing import make_block_target, serve_target

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("digests", [False, True])
async def test_reads_complete_by_the_success_flag_when_sq_flow_control_is_off(
    digests: bool,
) -> None:
    data = os.urandom(64 * 1024)
    with anyio.fail_after(30):
        async with (
            serve_target(make_block_target(kv=True)) as rt,
            Controller.connect(
                rt.address,
                rt.nqn,
                io_queues=2,
                sq_flow_control=False,
                header_digest=digests,
                data_digest=digests,
            ) as ctrl,
        ):
            block = BlockNamespaceClient(ctrl)
            await block.identify()
            await block.write(0, data)
            out = bytearray(len(data))
            for _ in range(4):
                await block.read(0, len(data) // block.block_size, out=out)
                assert out == data
            folded = sum(q.channel.success_completions for q in ctrl.io_queues)  # type: ignore[attr-defined]
            assert folded == 4  # every read: no CapsuleResp followed its data

            # A KV Retrieve carries the value size in DW0: never folded.
            kv = KVClient(ctrl)
            await kv.put(b"k", b"value")
            assert await kv.get(b"k") == b"value"
            assert sum(q.channel.success_completions for q in ctrl.io_queues) == 4  # type: ignore[attr-defined]


async def test_with_sq_flow_control_on_every_completion_is_a_capsule() -> None:
    with anyio.fail_after(30):
        async with (
            serve_target(make_block_target()) as rt,
            Controller.connect(rt.address, rt.nqn) as ctrl,
        ):
            block = BlockNamespaceClient(ctrl)
            await block.identify()
            await block.write(0, b"\x01" * block.block_size)
            assert await block.read(0, 1) == b"\x01" * block.block_size
            assert all(q.channel.success_completions == 0 for q in ctrl.io_queues)  # type: ignore[attr-defined]
