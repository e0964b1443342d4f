"""NVMe/RDMA over the simulator's verbs: the real target and initiator in virtual time."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio

from nvmeof.target.rdma_server import serve_rdma
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import Target
from simulator.fabric import Fabric, LinkSpec
from simulator.rdma import SimRdma
from simulator.verbs import VerbsFabric

TARGET_NODE = "t0"
HOST_NODE = "h0"
PORT = 4420


def make_rdma(seed: int = 0, *, remote_invalidate: bool = True) -> SimRdma:
    fabric = Fabric(seed, LinkSpec(latency=2e-6, bandwidth=12.5e9))
    return SimRdma(VerbsFabric(fabric), remote_invalidate=remote_invalidate)


@contextlib.asynccontextmanager
async def rdma_target(rdma: SimRdma, target: Target) -> AsyncIterator[TargetServer]:
    server = TargetServer(target)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_rdma, server, rdma.listen(TARGET_NODE, PORT))
        yield server
        tg.cancel_scope.cancel()
