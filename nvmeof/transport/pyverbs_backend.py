"""NVMe/RDMA on real RDMA devices through pyverbs (rdma-core's Python bindings): the ``rdma`` extra.

pyverbs comes from the distribution, not PyPI (the sdist does not build against Debian bookworm's
rdma-core): ``apt-get install python3-pyverbs rdma-core ibverbs-providers``. When it is installed
for the system Python but not importable here, this module appends the system's
``dist-packages`` directory to ``sys.path`` (pyverbs is built for the same Python minor version).
Without pyverbs, or without an RDMA device (hardware, or soft-RoCE: ``modprobe rdma_rxe; rdma link
add rxe0 type rxe netdev eth0``), ``RdmaUnavailable`` says so.

Connection setup is RDMA-CM in asynchronous mode (an event channel; the QP is ours, moved through
INIT/RTR/RTS with ``rdma_init_qp_attr``), run in worker threads because pyverbs exposes no event
channel descriptor. Completions: the installed pyverbs offers only a blocking
``CompChannel.get_cq_event()`` (no fd), so a waiter thread per endpoint blocks there and wakes the
event loop through a socket pair; ``poll_mode=True`` polls the CQ instead (yielding between polls).

Known limits: the host cannot read CRQSIZE from the accept on every pyverbs version; a target learns
of a host that vanished without a DREQ only through keep-alive; Send with Invalidate is answered
as the host asks but this host does not request it (that needs memory windows or fast
registration, which pyverbs here does not offer for a regular MR).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread

from nvmeof.errors import ConnectionLost
from nvmeof.transport.mr_cache import buffer_address
from nvmeof.transport.verbs import (
    Access,
    ConnectionRejected,
    Endpoint,
    MemoryRegion,
    RdmaUnavailable,
    RegistrationError,
    Sge,
    WcKind,
    WorkCompletion,
)

log = logging.getLogger("nvmeof.transport.pyverbs")

INSTALL_HINT = (
    "NVMe/RDMA needs pyverbs and an RDMA device: apt-get install python3-pyverbs rdma-core"
    " ibverbs-providers (pip install 'gpucache[rdma]' documents this; pyverbs is not on PyPI in a"
    " form that builds here), and a device: RDMA hardware, or soft-RoCE"
    " (modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <nic>)"
)
_SYSTEM_DIST = "/usr/lib/python3/dist-packages"


def load_pyverbs() -> Any:
    """The pyverbs package, or ``RdmaUnavailable`` saying how to install it."""
    try:
        import pyverbs
    except ImportError:
        if os.path.isdir(os.path.join(_SYSTEM_DIST, "pyverbs")) and _SYSTEM_DIST not in sys.path:
            sys.path.append(_SYSTEM_DIST)
            try:
                import pyverbs
            except ImportError as exc:
                raise RdmaUnavailable(f"{INSTALL_HINT} ({exc})") from None
        else:
            raise RdmaUnavailable(INSTALL_HINT) from None
    try:
        import pyverbs.cm_enums
        import pyverbs.cmid
        import pyverbs.cq
        import pyverbs.device
        import pyverbs.enums
        import pyverbs.mr
        import pyverbs.qp
        import pyverbs.wr
    except ImportError as exc:  # e.g. built for another Python, or libpython missing
        raise RdmaUnavailable(f"pyverbs does not load here ({exc}). {INSTALL_HINT}") from None
    return pyverbs


def rdma_devices() -> list[str]:
    """Names of the RDMA devices present (``RdmaUnavailable`` if pyverbs is missing)."""
    pv = load_pyverbs()
    try:
        devices = pv.device.get_device_list()
    except Exception:
        return []
    return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]


def require_device() -> None:
    if not rdma_devices():
        raise RdmaUnavailable(f"no RDMA device found. {INSTALL_HINT}")


class PyverbsMr:
    """A ``MemoryRegion`` over caller memory (``ibv_reg_mr`` at the buffer's address)."""

    def __init__(self, mr: Any, addr: int, length: int, owner: memoryview) -> None:
        self._mr = mr
        self.addr = addr
        self.length = length
        self.lkey = int(mr.lkey)
        self.rkey = int(mr.rkey)
        self._owner = owner  # the memory must outlive the registration

    def close(self) -> None:
        if self._mr is not None:
            self._mr.close()
            self._mr = None


class PyverbsEndpoint:
    """One RC QP (ours, connected through RDMA-CM) with its CQ and completion channel."""

    max_sge = 4

    def __init__(
        self,
        cmid: Any,
        peer: str,
        *,
        send_depth: int,
        recv_depth: int,
        poll_mode: bool = False,
        remote_invalidate: bool = True,
    ) -> None:
        pv = load_pyverbs()
        e = pv.enums
        self._pv = pv
        self.cmid = cmid
        self.peer = peer
        self.poll_mode = poll_mode
        self.remote_invalidate = remote_invalidate
        self.ctx = cmid.context
        self.pd = cmid.pd
        self.comp_channel = pv.cq.CompChannel(self.ctx)
        self.cq = pv.cq.CQ(self.ctx, 2 * (send_depth + recv_depth), None, self.comp_channel, 0)
        cap = pv.qp.QPCap(
            max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=self.max_sge,
            max_recv_sge=1,
        )  # fmt: skip
        init = pv.qp.QPInitAttr(
            qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1
        )
        self.qp = pv.qp.QP(self.pd, init)
        self.move(e.IBV_QPS_INIT)
        self.closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None

    def move(self, state: int) -> None:
        attr, mask = self.cmid.init_qp_attr(state)
        self.qp.modify(attr, mask)

    # --- memory -----------------------------------------------------------------------------
    def register(self, buffer: memoryview, access: Access) -> MemoryRegion:
        if not len(buffer):
            raise RegistrationError("cannot register an empty buffer")
        if buffer.readonly and access & (Access.LOCAL_WRITE | Access.REMOTE_WRITE):
            raise RegistrationError("read-only memory cannot be registered for writing")
        addr = buffer_address(buffer)
        try:
            mr = self._pv.mr.MR(self.pd, len(buffer), int(access), address=addr)
        except Exception as exc:
            raise RegistrationError(f"ibv_reg_mr failed: {exc}") from exc
        return PyverbsMr(mr, addr, len(buffer), buffer)

    def register_dmabuf(
        self, fd: int, offset: int, length: int, iova: int, access: Access
    ) -> MemoryRegion:
        try:
            mr = self._pv.mr.DmaBufMR(self.pd, length, int(access), dmabuf=fd, offset=offset)
        except Exception as exc:
            raise RegistrationError(f"ibv_reg_dmabuf_mr failed: {exc}") from exc
        return PyverbsMr(mr, int(getattr(mr, "buf", iova) or iova), length, memoryview(b""))

    # --- work requests ----------------------------------------------------------------------
    def _sges(self, sges: Sequence[Sge]) -> list[Any]:
        return [self._pv.wr.SGE(s.mr.addr + s.offset, s.length, s.mr.lkey) for s in sges]

    def _post(self, fn: Any, wr: Any) -> None:
        if self.closed:
            raise ConnectionLost(f"RDMA queue to {self.peer} is closed")
        try:
            fn(wr)
        except Exception as exc:
            raise ConnectionLost(f"RDMA post to {self.peer} failed: {exc}") from exc

    def post_recv(self, wr_id: int, sge: Sge) -> None:
        wr = self._pv.wr.RecvWR(wr_id, 1, self._sges([sge]))
        self._post(self.qp.post_recv, wr)

    def _send_wr(self, wr_id: int, opcode: int, sges: Sequence[Sge]) -> Any:
        e = self._pv.enums
        return self._pv.wr.SendWR(
            wr_id=wr_id, opcode=opcode, num_sge=len(sges), sg=self._sges(sges),
            send_flags=e.IBV_SEND_SIGNALED,
        )  # fmt: skip

    def post_send(
        self, wr_id: int, sges: Sequence[Sge], *, invalidate_rkey: int | None = None
    ) -> None:
        e = self._pv.enums
        if invalidate_rkey is None:
            wr = self._send_wr(wr_id, e.IBV_WR_SEND, sges)
        else:
            wr = self._send_wr(wr_id, e.IBV_WR_SEND_WITH_INV, sges)
            wr.imm_data = invalidate_rkey  # the union's invalidate_rkey, host byte order
        self._post(self.qp.post_send, wr)

    def post_write(self, wr_id: int, sges: Sequence[Sge], remote_addr: int, rkey: int) -> None:
        wr = self._send_wr(wr_id, self._pv.enums.IBV_WR_RDMA_WRITE, sges)
        wr.set_wr_rdma(rkey, remote_addr)
        self._post(self.qp.post_send, wr)

    def post_read(self, wr_id: int, sges: Sequence[Sge], remote_addr: int, rkey: int) -> None:
        wr = self._send_wr(wr_id, self._pv.enums.IBV_WR_RDMA_READ, sges)
        wr.set_wr_rdma(rkey, remote_addr)
        self._post(self.qp.post_send, wr)

    # --- completions ------------------------------------------------------------------------
    def poll(self) -> list[WorkCompletion]:
        e = self._pv.enums
        n, wcs = self.cq.poll(64)
        out = []
        for wc in wcs[:n]:
            if wc.opcode & e.IBV_WC_RECV:
                kind = WcKind.RECV
            elif wc.opcode == e.IBV_WC_RDMA_READ:
                kind = WcKind.RDMA_READ
            elif wc.opcode == e.IBV_WC_RDMA_WRITE:
                kind = WcKind.RDMA_WRITE
            else:
                kind = WcKind.SEND
            invalidated = int(wc.imm_data) if wc.wc_flags & e.IBV_WC_WITH_INV else None
            out.append(WorkCompletion(wc.wr_id, wc.status, kind, wc.byte_len, invalidated))
        return out

    def _waiter(self) -> None:
        while not self.closed:
            try:
                self.comp_channel.get_cq_event(self.cq)
                self.cq.ack_events(1)
            except Exception:
                break
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    async def wait(self) -> list[WorkCompletion]:
        while True:
            found = self.poll()
            if found:
                return found
            if self.closed:
                raise ConnectionLost(f"RDMA queue to {self.peer} is closed")
            if self.poll_mode:
                await anyio.lowlevel.checkpoint()
                continue
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._waiter, name=f"cq-waiter {self.peer}", daemon=True
                )
                self._thread.start()
            self.cq.req_notify()
            found = self.poll()  # what completed before the CQ was armed
            if found:
                return found
            await anyio.wait_socket_readable(self._wake_r)
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.cq.req_notify()
        with contextlib.suppress(Exception):
            self.cmid.disconnect()  # the QP goes to error: posted receives flush, waking the waiter
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._thread.join, 2.0)
        if self._thread is None or not self._thread.is_alive():
            for obj in (self.qp, self.cq, self.comp_channel):
                with contextlib.suppress(Exception):
                    obj.close()
        with contextlib.suppress(Exception):
            self.cmid.close()
        self._wake_r.close()
        self._wake_w.close()


def _set_private_data(param: Any, data: bytes) -> None:
    try:
        param.set_private_data(data)
    except TypeError:
        param.set_private_data(data, len(data))


def _expect(pv: Any, channel: Any, wanted: int) -> Any:
    event = pv.cmid.CMEvent(channel)
    if event.event_type != wanted:
        what = event.event_str()
        event.ack_cm_event()
        raise ConnectionLost(f"RDMA-CM: {what}")
    return event


class PyverbsConnector:
    """The host side of RDMA-CM (``nvmeof.transport.verbs.RdmaConnector``)."""

    def __init__(self, *, poll_mode: bool = False, timeout_ms: int = 2000) -> None:
        require_device()
        self.poll_mode = poll_mode
        self.timeout_ms = timeout_ms

    async def __call__(
        self, host: str, port: int, private_data: bytes, *, send_depth: int, recv_depth: int
    ) -> tuple[Endpoint, bytes]:
        return await anyio.to_thread.run_sync(
            self._connect, host, port, private_data, send_depth, recv_depth
        )

    def _connect(
        self, host: str, port: int, private_data: bytes, send_depth: int, recv_depth: int
    ) -> tuple[Endpoint, bytes]:
        pv = load_pyverbs()
        ce, e = pv.cm_enums, pv.enums
        channel = pv.cmid.CMEventChannel()
        cmid = pv.cmid.CMID(channel)
        try:
            info = pv.cmid.AddrInfo(dst=host, dst_service=str(port), port_space=ce.RDMA_PS_TCP)
            cmid.resolve_addr(info, self.timeout_ms)
            _expect(pv, channel, ce.RDMA_CM_EVENT_ADDR_RESOLVED).ack_cm_event()
            cmid.resolve_route(self.timeout_ms)
            _expect(pv, channel, ce.RDMA_CM_EVENT_ROUTE_RESOLVED).ack_cm_event()
            endpoint = PyverbsEndpoint(
                cmid, f"{host}:{port}", send_depth=send_depth, recv_depth=recv_depth,
                poll_mode=self.poll_mode,
            )  # fmt: skip
            param = pv.cmid.ConnParam(resources=0, depth=16, retry=7, rnr_retry=7)
            param.qpn = endpoint.qp.qp_num
            _set_private_data(param, private_data)
            cmid.connect(param)
            event = pv.cmid.CMEvent(channel)
            kind = event.event_type
            data = bytes(event.private_data or b"")
            event.ack_cm_event()
            if kind == ce.RDMA_CM_EVENT_REJECTED:
                raise ConnectionRejected(f"{host}:{port}: rejected", data)
            if kind not in (ce.RDMA_CM_EVENT_CONNECT_RESPONSE, ce.RDMA_CM_EVENT_ESTABLISHED):
                raise ConnectionLost(f"{host}:{port}: RDMA-CM event {kind}")
            endpoint.move(e.IBV_QPS_RTR)
            endpoint.move(e.IBV_QPS_RTS)
            if kind == ce.RDMA_CM_EVENT_CONNECT_RESPONSE:
                cmid.establish()
            endpoint.cm_channel = channel  # type: ignore[attr-defined]
            return endpoint, data
        except ConnectionLost:
            cmid.close()
            raise
        except Exception as exc:
            cmid.close()
            raise ConnectionLost(f"RDMA connect to {host}:{port} failed: {exc}") from exc


class PyverbsConnectRequest:
    def __init__(self, listener: PyverbsListener, cmid: Any, private_data: bytes) -> None:
        self.listener = listener
        self.cmid = cmid
        self.private_data = private_data
        self.peer = "rdma-host"
        self.endpoint: PyverbsEndpoint | None = None

    def create_endpoint(self, *, send_depth: int, recv_depth: int) -> Endpoint:
        e = self.listener.pv.enums
        try:
            self.endpoint = PyverbsEndpoint(
                self.cmid, self.peer, send_depth=send_depth, recv_depth=recv_depth,
                poll_mode=self.listener.poll_mode,
            )  # fmt: skip
            self.endpoint.move(e.IBV_QPS_RTR)
            self.endpoint.move(e.IBV_QPS_RTS)
        except ConnectionLost:
            raise
        except Exception as exc:
            raise ConnectionLost(f"creating the queue pair failed: {exc}") from exc
        return self.endpoint

    async def accept(self, private_data: bytes) -> None:
        assert self.endpoint is not None
        pv = self.listener.pv
        param = pv.cmid.ConnParam(resources=16, depth=0, retry=7, rnr_retry=7)
        param.qpn = self.endpoint.qp.qp_num
        _set_private_data(param, private_data)
        try:
            await anyio.to_thread.run_sync(self.cmid.accept, param)
        except Exception as exc:
            raise ConnectionLost(f"RDMA accept failed: {exc}") from exc

    async def reject(self, private_data: bytes) -> None:
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(self.cmid.reject, private_data, len(private_data))


class PyverbsListener:
    """An RDMA-CM listener (``nvmeof.transport.verbs.RdmaListener``); connect requests come from
    a thread blocked in ``rdma_get_cm_event``."""

    def __init__(self, host: str, port: int = 4420, *, poll_mode: bool = False) -> None:
        self.pv = pv = load_pyverbs()
        require_device()
        ce = pv.cm_enums
        self.host = host
        self.port = port
        self.poll_mode = poll_mode
        self.channel = pv.cmid.CMEventChannel()
        self.cmid = pv.cmid.CMID(self.channel)
        info = pv.cmid.AddrInfo(
            src=host, src_service=str(port), port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE
        )
        try:
            self.cmid.bind_addr(info)
            self.cmid.listen(128)
        except Exception as exc:
            self.cmid.close()
            raise RdmaUnavailable(f"cannot listen on {host}:{port} over RDMA: {exc}") from exc
        self._send, self._receive = anyio.create_memory_object_stream[PyverbsConnectRequest](128)
        self._closed = False
        self._token = anyio.lowlevel.current_token()
        self._thread = threading.Thread(target=self._events, name="rdma-cm events", daemon=True)
        self._thread.start()

    def _events(self) -> None:
        pv = self.pv
        ce = pv.cm_enums
        while not self._closed:
            try:
                event = pv.cmid.CMEvent(self.channel)
            except Exception:
                return
            kind = event.event_type
            if kind == ce.RDMA_CM_EVENT_CONNECT_REQUEST:
                data = bytes(event.private_data or b"")
                child = pv.cmid.CMID(creator=event, listen_id=self.cmid)
                request = PyverbsConnectRequest(self, child, data)
                event.ack_cm_event()
                with contextlib.suppress(Exception):
                    anyio.from_thread.run_sync(self._send.send_nowait, request, token=self._token)
            else:
                log.debug("RDMA-CM event %s", event.event_str())
                event.ack_cm_event()

    async def next_request(self) -> PyverbsConnectRequest:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._closed = True
        self._send.close()
        with contextlib.suppress(Exception):
            self.cmid.close()
