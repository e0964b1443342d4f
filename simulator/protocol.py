"""The real NVMe/TCP target and initiator on simulated nodes (protocol mode's building blocks)."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.abc

from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import Target
from simulator.stream import SimNetwork, Signal, serve_streams

NVME_PORT = 4420


async def serve_target_node(
    network: SimNetwork,
    node: str,
    make_target: Callable[[], Target],
    *,
    port: int = NVME_PORT,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a ``TargetServer`` on ``node:port`` over simulated TCP, until cancelled.

    Each connection goes to the real ``TargetServer.handle_connection``. When the node crashes its
    listener and connections go; after ``restart()`` a fresh target from ``make_target()`` serves
    (a DRAM target comes back empty, as a real one would).
    """
    fabric_node = network.fabric.node(node)
    changed = Signal()
    fabric_node.watch(changed.fire)
    started = False
    while True:
        while not fabric_node.up:
            await changed.wait()
        server = TargetServer(make_target())
        if started:
            await serve_streams(network, node, port, server.handle_connection)
        else:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_streams, network, node, port, server.handle_connection)
                started = True
                task_status.started()
