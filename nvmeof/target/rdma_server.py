"""The target's NVMe/RDMA listener: RDMA-CM connect requests become queues served by the same
``QueueSession`` as NVMe/TCP connections (``TargetServer.serve_channel``).

A connect request's private data is checked first (REFERENCE.md section 7: record format, QID,
HSQSIZE, HRQSIZE) and refused with the NVMe/RDMA reject code; otherwise the queue pair is created
with one capsule receive per submission queue entry (HSQSIZE + 1) posted before the accept, which
carries CRQSIZE.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from nvmeof.errors import ConnectionLost, NvmeofError
from nvmeof.rdma.cm import (
    AcceptData,
    PrivateDataError,
    QueueLimits,
    RejectData,
    RejectStatus,
    check_connect_request,
)
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import ListenAddress
from nvmeof.transport.rdma import RdmaControllerChannel
from nvmeof.transport.verbs import ConnectRequest, RdmaListener

log = logging.getLogger("nvmeof.target.rdma")


async def serve_rdma(
    server: TargetServer,
    listener: RdmaListener,
    *,
    address: ListenAddress | None = None,
    task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``server``'s target on an RDMA listener until cancelled."""
    if address is None:
        address = ListenAddress(traddr=listener.host, trsvcid=str(listener.port), trtype="RDMA")
    ports = server.target.listen_addresses
    ports.append(address)
    log.info("listening on %s:%d (NVMe/RDMA)", listener.host, listener.port)
    try:
        async with anyio.create_task_group() as tg:
            task_status.started((listener.host, listener.port))
            while True:
                request = await listener.next_request()
                tg.start_soon(handle_rdma_request, server, request, address)
    finally:
        ports.remove(address)
        with anyio.CancelScope(shield=True):
            await listener.aclose()


async def handle_rdma_request(
    server: TargetServer, request: ConnectRequest, address: ListenAddress | None = None
) -> None:
    """Accept (or reject) one connect request, then serve the queue until it ends."""
    limits = server.target.limits
    try:
        data = check_connect_request(
            request.private_data, QueueLimits(limits.max_queue_entries, limits.max_io_queues)
        )
    except PrivateDataError as exc:
        log.warning("rejecting RDMA connect from %s: %s", request.peer, exc)
        await request.reject(RejectData(exc.status).pack())
        return
    recv_depth = data.hsqsize + 1
    send_depth = max(data.hrqsize, 1)
    try:
        endpoint = request.create_endpoint(send_depth=send_depth * 3, recv_depth=recv_depth)
    except NvmeofError as exc:
        log.warning("no queue pair for %s: %s", request.peer, exc)
        await request.reject(RejectData(RejectStatus.NO_RESOURCES).pack())
        return
    try:
        channel = RdmaControllerChannel(
            endpoint,
            recv_depth=recv_depth,
            send_depth=send_depth,
            in_capsule_size=limits.in_capsule_data_size_for("rdma"),
        )
    except NvmeofError as exc:
        log.warning("no buffers for %s: %s", request.peer, exc)
        await endpoint.aclose()
        await request.reject(RejectData(RejectStatus.NO_RESOURCES).pack())
        return
    try:
        await request.accept(AcceptData(crqsize=recv_depth).pack())
    except ConnectionLost as exc:
        log.info("RDMA connect from %s failed at accept: %s", request.peer, exc)
        await channel.aclose()
        return
    log.debug("RDMA queue %d from %s: %d capsules in, %d out", data.qid, request.peer,
              recv_depth, send_depth)  # fmt: skip
    await server.serve_channel(channel, address)
