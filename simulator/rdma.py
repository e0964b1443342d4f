"""The NVMe/RDMA transport over the simulated verbs layer: ``nvmeof.transport.verbs`` implemented
on ``simulator.verbs``, with an RDMA-CM-like connection setup over the simulated fabric.

``SimRdma(verbs)`` gives each node one device (context + PD), a ``listen(node, port)`` for the
target and a ``connector(node)`` for ``Controller.connect(..., transport="rdma",
rdma_connector=...)``. A connect request travels one link latency to the listener, the answer
one back; accept connects the two QPs (RESET -> INIT -> RTR -> RTS), reject hands the host the
reject private data, and a port with no listener is refused. Disconnecting moves the local QP to
the error state (posted work flushes) and, a link latency later, the peer's: what a DREQ does.

Send with Invalidate, which ``simulator.verbs`` lacks, is carried as SEND_WITH_IMM whose
immediate is the rkey; the receiving endpoint invalidates that rkey (the region stays usable
locally, as a remotely invalidated key is) and reports it as ``invalidated_rkey``.

Completions are waited for in (virtual) time: every waiting endpoint is woken whenever the
verbs fabric schedules work, and otherwise at the next scheduled event.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import anyio
import anyio.abc

from nvmeof.errors import ConnectionLost
from nvmeof.transport.verbs import (
    Access,
    ConnectionRejected,
    Endpoint,
    MemoryRegion,
    RdmaConnector,
    RegistrationError,
    Sge,
    WcKind,
    WorkCompletion,
)
from simulator.fabric import LinkState
from simulator.verbs import (
    CQ,
    MR,
    PD,
    QP,
    SGE,
    Context,
    QPCap,
    QPInitAttr,
    QPState,
    RecvWR,
    SendWR,
    VerbsError,
    VerbsFabric,
    WcOpcode,
    WrOpcode,
)
from simulator.verbs import WC as SimWC

_KINDS = {
    WcOpcode.SEND: WcKind.SEND,
    WcOpcode.RDMA_WRITE: WcKind.RDMA_WRITE,
    WcOpcode.RDMA_READ: WcKind.RDMA_READ,
    WcOpcode.RECV: WcKind.RECV,
    WcOpcode.RECV_RDMA_WITH_IMM: WcKind.RECV,
}


class SimRdma:
    """RDMA devices and connection management for the nodes of one ``VerbsFabric``."""

    def __init__(self, verbs: VerbsFabric, *, remote_invalidate: bool = True) -> None:
        if verbs.clock is None:
            verbs.clock = anyio.current_time
        self.verbs = verbs
        self.remote_invalidate = remote_invalidate
        self._devices: dict[str, tuple[Context, PD]] = {}
        self._listeners: dict[tuple[str, int], SimListener] = {}
        self._waiters: set[anyio.Event] = set()
        verbs.on_event = self._wake

    def device(self, node: str) -> tuple[Context, PD]:
        if node not in self._devices:
            ctx = Context(self.verbs, node)
            self._devices[node] = (ctx, PD(ctx))
        return self._devices[node]

    def listen(self, node: str, port: int = 4420) -> SimListener:
        if (node, port) in self._listeners:
            raise OSError(f"{node}:{port} is already listened on")
        listener = SimListener(self, node, port)
        self._listeners[(node, port)] = listener
        return listener

    def connector(self, node: str) -> RdmaConnector:
        return SimConnector(self, node)

    def latency(self, a: str, b: str) -> float:
        return self.verbs.fabric.link(a, b).spec.latency

    def _wake(self) -> None:
        for event in self._waiters:
            event.set()

    async def wait(self, cq: CQ) -> list[SimWC]:
        while True:
            _, wcs = cq.poll(256)
            if wcs:
                return wcs
            event = anyio.Event()
            self._waiters.add(event)
            due = self.verbs.next_time()
            try:
                with anyio.CancelScope(deadline=math.inf if due is None else due):
                    await event.wait()
            finally:
                self._waiters.discard(event)


class SimEndpoint:
    """One RC QP with its CQ on a simulated device (``nvmeof.transport.verbs.Endpoint``)."""

    max_sge = 4

    def __init__(
        self,
        rdma: SimRdma,
        node: str,
        peer: str,
        *,
        send_depth: int,
        recv_depth: int,
        poll_mode: bool = False,
    ) -> None:
        self.rdma = rdma
        self.node = node
        self.peer = peer
        self.poll_mode = poll_mode
        self.remote_invalidate = rdma.remote_invalidate
        self.ctx, self.pd = rdma.device(node)
        self.cq = CQ(self.ctx, 4 * (send_depth + recv_depth))
        cap = QPCap(
            max_send_wr=send_depth * 2, max_recv_wr=recv_depth, max_send_sge=self.max_sge,
            max_recv_sge=1,
        )  # fmt: skip
        self.qp = QP(self.pd, QPInitAttr(send_cq=self.cq, recv_cq=self.cq, cap=cap))
        self.qp.to_init()
        self.remote: SimEndpoint | None = None
        self.closed = False

    def register(self, buffer: memoryview, access: Access) -> MemoryRegion:
        if not len(buffer):
            raise RegistrationError("cannot register an empty buffer")
        if buffer.readonly and access & (Access.LOCAL_WRITE | Access.REMOTE_WRITE):
            raise RegistrationError("read-only memory cannot be registered for writing")
        return MR(self.pd, len(buffer), int(access), buf=cast(bytearray, buffer))

    @staticmethod
    def _sges(sges: Sequence[Sge]) -> list[SGE]:
        return [SGE(s.mr.addr + s.offset, s.length, s.mr.lkey) for s in sges]

    def _post(self, post: object, wr: object) -> None:
        if self.closed:
            raise ConnectionLost(f"RDMA queue to {self.peer} is closed")
        try:
            post(wr)  # type: ignore[operator]
        except VerbsError as exc:
            raise ConnectionLost(f"RDMA post to {self.peer} failed: {exc}") from exc

    def post_recv(self, wr_id: int, sge: Sge) -> None:
        self._post(self.qp.post_recv, RecvWR(wr_id, self._sges([sge])))

    def post_send(
        self, wr_id: int, sges: Sequence[Sge], *, invalidate_rkey: int | None = None
    ) -> None:
        if invalidate_rkey is None:
            wr = SendWR(wr_id, WrOpcode.SEND, self._sges(sges))
        else:
            wr = SendWR(wr_id, WrOpcode.SEND_WITH_IMM, self._sges(sges), imm_data=invalidate_rkey)
        self._post(self.qp.post_send, wr)

    def post_write(self, wr_id: int, sges: Sequence[Sge], remote_addr: int, rkey: int) -> None:
        wr = SendWR(wr_id, WrOpcode.RDMA_WRITE, self._sges(sges), remote_addr, rkey)
        self._post(self.qp.post_send, wr)

    def post_read(self, wr_id: int, sges: Sequence[Sge], remote_addr: int, rkey: int) -> None:
        wr = SendWR(wr_id, WrOpcode.RDMA_READ, self._sges(sges), remote_addr, rkey)
        self._post(self.qp.post_send, wr)

    def _convert(self, wc: SimWC) -> WorkCompletion:
        invalidated = None
        if wc.opcode is WcOpcode.RECV and wc.imm_data and wc.status == 0:
            invalidated = wc.imm_data
            mr = self.ctx.mrs.get(invalidated)
            if mr is not None and mr.rkey == invalidated:
                del self.ctx.mrs[invalidated]  # the key stops working remotely; lkey still does
        kind = _KINDS.get(wc.opcode, WcKind.SEND)
        return WorkCompletion(wc.wr_id, int(wc.status), kind, wc.byte_len, invalidated)

    def poll(self) -> list[WorkCompletion]:
        _, wcs = self.cq.poll(256)
        return [self._convert(wc) for wc in wcs]

    async def wait(self) -> list[WorkCompletion]:
        if self.poll_mode:
            while True:  # poll; between polls only yield (or skip to the next event)
                found = self.poll()
                if found:
                    return found
                due = self.rdma.verbs.next_time()
                if due is None:
                    break  # nothing can complete until someone posts: wait for that
                await anyio.sleep_until(due)
        return [self._convert(wc) for wc in await self.rdma.wait(self.cq)]

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        verbs = self.rdma.verbs
        verbs.sync()
        self.qp.to_error()
        remote = self.remote
        if remote is not None and not remote.closed:
            verbs.schedule(
                verbs.now + self.rdma.latency(self.node, remote.node), remote.qp.to_error
            )
        await anyio.lowlevel.checkpoint()


class SimConnectRequest:
    def __init__(
        self, listener: SimListener, host_endpoint: SimEndpoint, private_data: bytes
    ) -> None:
        self.listener = listener
        self.peer = host_endpoint.node
        self.private_data = private_data
        self.host_endpoint = host_endpoint
        self.endpoint: SimEndpoint | None = None
        self.answered = anyio.Event()
        self.accepted = False
        self.answer = b""

    def create_endpoint(self, *, send_depth: int, recv_depth: int) -> Endpoint:
        self.endpoint = SimEndpoint(
            self.listener.rdma, self.listener.host, self.peer,
            send_depth=send_depth, recv_depth=recv_depth,
        )  # fmt: skip
        return self.endpoint

    async def accept(self, private_data: bytes) -> None:
        if self.endpoint is None:
            raise RuntimeError("create_endpoint before accept")
        host = self.host_endpoint
        if host.closed or host.qp.state is not QPState.INIT:
            raise ConnectionLost(f"{self.peer} went away before the accept")
        try:
            self.endpoint.qp.connect(host.qp)
        except VerbsError as exc:
            raise ConnectionLost(f"connecting the queue pairs failed: {exc}") from exc
        self.endpoint.remote, host.remote = host, self.endpoint
        self.accepted, self.answer = True, private_data
        self.answered.set()

    async def reject(self, private_data: bytes) -> None:
        self.answer = private_data
        self.answered.set()
        if self.endpoint is not None:
            await self.endpoint.aclose()


class SimListener:
    def __init__(self, rdma: SimRdma, host: str, port: int) -> None:
        self.rdma = rdma
        self.host = host
        self.port = port
        self._send, self._receive = anyio.create_memory_object_stream[SimConnectRequest](64)

    def deliver(self, request: SimConnectRequest) -> None:
        self._send.send_nowait(request)

    async def next_request(self) -> SimConnectRequest:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self.rdma._listeners.pop((self.host, self.port), None)
        self._send.close()
        self._receive.close()


class SimConnector:
    """The host side of the simulated RDMA-CM, for one node."""

    def __init__(self, rdma: SimRdma, node: str, *, poll_mode: bool = False) -> None:
        self.rdma = rdma
        self.node = node
        self.poll_mode = poll_mode

    async def __call__(
        self,
        host: str,
        port: int,
        private_data: bytes,
        *,
        send_depth: int,
        recv_depth: int,
    ) -> tuple[Endpoint, bytes]:
        rdma = self.rdma
        link = rdma.verbs.fabric.link(self.node, host)
        if link.state is LinkState.CUT or not rdma.verbs.fabric.node(host).up:
            raise ConnectionLost(f"no route to {host}")
        latency = rdma.latency(self.node, host)
        endpoint = SimEndpoint(
            rdma, self.node, host, send_depth=send_depth, recv_depth=recv_depth,
            poll_mode=self.poll_mode,
        )  # fmt: skip
        await anyio.sleep(latency)
        listener = rdma._listeners.get((host, port))
        if listener is None:
            await anyio.sleep(latency)
            await endpoint.aclose()
            raise ConnectionRejected(f"{host}:{port}: connection refused (no listener)")
        request = SimConnectRequest(listener, endpoint, bytes(private_data))
        try:
            listener.deliver(request)
            await request.answered.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await endpoint.aclose()
            raise
        await anyio.sleep(latency)
        if not request.accepted:
            await endpoint.aclose()
            raise ConnectionRejected(f"{host}:{port}: connection rejected", request.answer)
        return endpoint, request.answer
