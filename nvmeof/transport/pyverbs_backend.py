"""NVMe/RDMA on real RDMA devices through pyverbs (rdma-core's Python bindings): the ``rdma`` extra.

pyverbs comes from the distribution, not PyPI (the sdist does not build against Debian bookworm's
rdma-core): ``apt-get install python3-pyverbs rdma-core ibverbs-providers``. When it is installed
for the system Python but not importable here, this module appends the system's
``dist-packages`` directory to ``sys.path`` (pyverbs is built for the same Python minor version).
Without pyverbs, or without an RDMA device (hardware, or soft-RoCE: ``modprobe rdma_rxe; rdma link
add rxe0 type rxe netdev eth0``), ``RdmaUnavailable`` says so.

No blocking call into pyverbs: its ``rdma_get_cm_event`` and ``ibv_get_cq_event`` wrappers keep the
GIL while they block (rdma-core 44 has no ``nogil`` there), so a thread waiting in one stalls the
whole process. Instead both channels' file descriptors are made non-blocking and waited on from
the event loop (``anyio.wait_readable``). pyverbs does not expose those descriptors either, so
each is found as the one new ``/dev/infiniband/rdma_cm`` (CM event channel) or
``anon_inode:[infinibandevent]`` (completion channel) entry in ``/proc/self/fd`` across its
creation, under a lock that every pyverbs call which may open such a descriptor takes. Where that
fails (no ``/proc``), completions are polled with a short sleep and CM events read in a worker
thread, with a warning; ``poll_mode=True`` polls the CQ on purpose (yielding between polls).

Connection setup is RDMA-CM with our own QP, moved through INIT/RTR/RTS with ``rdma_init_qp_attr``.
RDMA READ credits are explicit: the host offers responder resources (the controller pulls write
data with RDMA READ), the controller accepts with an initiator depth no larger than that offer.

Known limits: pyverbs' work completions do not carry the invalidated rkey (the flag only); a
target learns of a host that went away only through keep-alive (pyverbs' CM events do not say
which connection a DISCONNECTED belongs to); this host does not request Send with Invalidate (that
needs memory windows or fast registration, which pyverbs here does not offer for a regular MR).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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
_CM_FD = "/dev/infiniband/rdma_cm"
_EVENT_FD = "anon_inode:[infinibandevent]"
RD_ATOMIC = 16  # RDMA READs in flight per queue (responder resources / initiator depth)
POLL_SLEEP_S = 0.0005  # the sleep between polls where no completion channel fd was found
_T = TypeVar("_T")

# Taken around every pyverbs call that may open an RDMA-CM or verbs event descriptor, so that the
# one new descriptor seen across a channel's creation is that channel's.
_FD_LOCK = threading.Lock()


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


def _fds(target: str) -> set[int]:
    found: set[int] = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.add(int(name))
    return found


def _with_new_fd(create: Callable[[], _T], target: str) -> tuple[_T, int | None]:
    """``create()``, and the one descriptor (made non-blocking) it opened that links to
    ``target``; ``None`` where there is not exactly one."""
    with _FD_LOCK:
        before = _fds(target)
        obj = create()
        new = _fds(target) - before
    if len(new) != 1:
        log.warning("cannot tell pyverbs' %s descriptor (%d candidates)", target, len(new))
        return obj, None
    fd = new.pop()
    os.set_blocking(fd, False)
    return obj, fd


def _would_block(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in (errno.EAGAIN, errno.EWOULDBLOCK)


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
    """One RC QP (ours, connected through RDMA-CM) with its CQ and completion channel.

    ``wait`` arms the CQ, polls once more (what completed before it was armed), then sleeps in the
    event loop on the completion channel's descriptor; ``poll_mode`` polls instead.
    """

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
        anchor: Any = None,
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
        self.comp_channel, self._fd = _with_new_fd(lambda: pv.cq.CompChannel(self.ctx), _EVENT_FD)
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
        self._armed = False
        self.cm_channel: Any = None  # the host's CM event channel, kept with its connection
        self._anchor = anchor  # the CM ID whose Context and PD a target's CM ID borrowed
        self._mrs: weakref.WeakSet[PyverbsMr] = weakref.WeakSet()

    def move(self, state: int, *, max_rd_atomic: int | None = None) -> None:
        attr, mask = self.cmid.init_qp_attr(state)
        if max_rd_atomic is not None:
            attr.max_rd_atomic = min(attr.max_rd_atomic, max_rd_atomic)
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
        region = PyverbsMr(mr, addr, len(buffer), buffer)
        self._mrs.add(region)
        return region

    def register_dmabuf(
        self, fd: int, offset: int, length: int, iova: int, access: Access
    ) -> MemoryRegion:
        try:
            mr = self._pv.mr.DmaBufMR(self.pd, length, int(access), dmabuf=fd, offset=offset)
        except Exception as exc:
            raise RegistrationError(f"ibv_reg_dmabuf_mr failed: {exc}") from exc
        region = PyverbsMr(mr, int(getattr(mr, "buf", iova) or iova), length, memoryview(b""))
        self._mrs.add(region)
        return region

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
        if self.closed and self.cq is None:
            return []
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
            # (pyverbs 44's WC leaves imm_data, so the invalidated rkey, at 0: only the flag counts)
            invalidated = int(wc.imm_data) if wc.wc_flags & e.IBV_WC_WITH_INV else None
            out.append(WorkCompletion(wc.wr_id, wc.status, kind, wc.byte_len, invalidated))
        return out

    def _take_events(self) -> None:
        """Read (without blocking) and acknowledge the completion events that are there."""
        taken = 0
        while True:
            try:
                self.comp_channel.get_cq_event(self.cq)
            except Exception as exc:
                if not _would_block(exc):
                    log.debug("[%s] ibv_get_cq_event: %s", self.peer, exc)
                break
            taken += 1
        if taken:
            self.cq.ack_events(taken)
            self._armed = False

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
            if self._fd is None:
                await anyio.sleep(POLL_SLEEP_S)
                continue
            if not self._armed:
                self.cq.req_notify()
                self._armed = True
                found = self.poll()  # what completed before the CQ was armed
                if found:
                    return found
            try:
                await anyio.wait_readable(self._fd)
            except (anyio.ClosedResourceError, OSError):
                raise ConnectionLost(f"RDMA queue to {self.peer} is closed") from None
            if self.closed:
                raise ConnectionLost(f"RDMA queue to {self.peer} is closed")
            self._take_events()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        e = self._pv.enums
        with contextlib.suppress(Exception):
            self.cmid.disconnect()  # tells the peer (DREQ); our own QP is not touched by it
        with contextlib.suppress(Exception):
            self.qp.modify(self._pv.qp.QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
        if self._fd is not None:
            anyio.notify_closing(self._fd)  # a task waiting on the channel gets ConnectionLost
            await anyio.lowlevel.checkpoint()
        # The MRs go before the CM ID: the PD is librdmacm's (one per device, freed with the
        # device's last CM ID), which pyverbs' PD only wraps (so it is never closed here).
        for mr in list(self._mrs):
            mr.close()
        for obj in (self.qp, self.cq, self.comp_channel):
            with contextlib.suppress(Exception):
                obj.close()
        self.cq = None
        for cm in (self.cmid, self._anchor, self.cm_channel):
            if cm is not None:
                with contextlib.suppress(Exception):
                    cm.close()


def _conn_param(pv: Any, qpn: int, data: bytes, *, resources: int, depth: int) -> Any:
    """An ``rdma_conn_param`` carrying ``data``: pyverbs copies private data only into the room
    ``data_len`` made for it (a ``set_private_data`` without it sends nothing)."""
    param = pv.cmid.ConnParam(
        resources=resources, depth=depth, retry=7, rnr_retry=7, data_len=len(data)
    )
    param.qpn = qpn
    param.set_private_data(data)
    if bytes(param.private_data)[: len(data)] != data:
        raise RdmaUnavailable("this pyverbs does not carry RDMA-CM private data")
    return param


def _rd_atomic(ctx: Any, field: str) -> int:
    try:
        return max(1, min(RD_ATOMIC, int(getattr(ctx.query_device(), field))))
    except Exception:
        return RD_ATOMIC


class _CmEvents:
    """Events of one RDMA-CM event channel, read without blocking the process."""

    def __init__(self, pv: Any) -> None:
        self.pv = pv
        self.channel, self.fd = _with_new_fd(pv.cmid.CMEventChannel, _CM_FD)

    async def next(self) -> Any:
        if self.fd is None:  # blocks a worker thread and, pyverbs keeping the GIL, the process
            return await anyio.to_thread.run_sync(self.pv.cmid.CMEvent, self.channel)
        while True:
            try:
                return self.pv.cmid.CMEvent(self.channel)
            except Exception as exc:
                if not _would_block(exc):
                    raise
            await anyio.wait_readable(self.fd)

    async def expect(self, wanted: int) -> Any:
        event = await self.next()
        if event.event_type != wanted:
            what = event.event_str()
            event.ack_cm_event()
            raise ConnectionLost(f"RDMA-CM: {what}")
        return event

    def close(self) -> None:
        if self.fd is not None:
            anyio.notify_closing(self.fd)
        with contextlib.suppress(Exception):
            self.channel.close()


class PyverbsConnector:
    """The host side of RDMA-CM (``nvmeof.transport.verbs.RdmaConnector``)."""

    def __init__(self, *, poll_mode: bool = False, timeout_ms: int = 2000) -> None:
        require_device()
        self.poll_mode = poll_mode
        self.timeout_ms = timeout_ms

    async def __call__(
        self, host: str, port: int, private_data: bytes, *, send_depth: int, recv_depth: int
    ) -> tuple[Endpoint, bytes]:
        pv = load_pyverbs()
        ce, e = pv.cm_enums, pv.enums
        events = _CmEvents(pv)
        cmid = pv.cmid.CMID(events.channel)
        endpoint: PyverbsEndpoint | None = None
        try:
            info = pv.cmid.AddrInfo(dst=host, dst_service=str(port), port_space=ce.RDMA_PS_TCP)
            with _FD_LOCK:  # may open the device (its async event descriptor)
                cmid.resolve_addr(info, self.timeout_ms)
            (await events.expect(ce.RDMA_CM_EVENT_ADDR_RESOLVED)).ack_cm_event()
            with _FD_LOCK:
                cmid.resolve_route(self.timeout_ms)
            (await events.expect(ce.RDMA_CM_EVENT_ROUTE_RESOLVED)).ack_cm_event()
            endpoint = PyverbsEndpoint(
                cmid, f"{host}:{port}", send_depth=send_depth, recv_depth=recv_depth,
                poll_mode=self.poll_mode,
            )  # fmt: skip
            # Responder resources: the RDMA READs the controller may have in flight against us.
            resources = _rd_atomic(cmid.context, "max_qp_rd_atom")
            param = _conn_param(pv, endpoint.qp.qp_num, private_data, resources=resources, depth=0)
            cmid.connect(param)
            event = await events.next()
            kind = event.event_type
            what = event.event_str()
            data = bytes(event.private_data or b"")
            event.ack_cm_event()
            if kind == ce.RDMA_CM_EVENT_REJECTED:
                raise ConnectionRejected(f"{host}:{port}: rejected", data)
            if kind not in (ce.RDMA_CM_EVENT_CONNECT_RESPONSE, ce.RDMA_CM_EVENT_ESTABLISHED):
                raise ConnectionLost(f"{host}:{port}: RDMA-CM {what}")
            # INIT again first, as librdmacm does for its own QPs: before the CM exchange the
            # INIT attributes carry no remote access (the controller's RDMA READ and WRITE
            # would then fail with a remote invalid request).
            endpoint.move(e.IBV_QPS_INIT)
            endpoint.move(e.IBV_QPS_RTR)
            endpoint.move(e.IBV_QPS_RTS)
            if kind == ce.RDMA_CM_EVENT_CONNECT_RESPONSE:
                cmid.establish()
            endpoint.cm_channel = events.channel
            return endpoint, data
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if endpoint is not None:
                    endpoint.cm_channel = None
                    await endpoint.aclose()
                else:
                    with contextlib.suppress(Exception):
                        cmid.close()
            events.close()
            if isinstance(exc, (ConnectionLost, anyio.get_cancelled_exc_class())):
                raise
            if not isinstance(exc, Exception):
                raise
            raise ConnectionLost(f"RDMA connect to {host}:{port} failed: {exc}") from exc


class PyverbsConnectRequest:
    def __init__(
        self, listener: PyverbsListener, cmid: Any, private_data: bytes, anchor: Any
    ) -> None:
        self.listener = listener
        self.cmid = cmid
        self.anchor = anchor
        self.private_data = private_data
        self.peer = "rdma-host"
        self.endpoint: PyverbsEndpoint | None = None
        self.depth = RD_ATOMIC

    def create_endpoint(self, *, send_depth: int, recv_depth: int) -> Endpoint:
        e = self.listener.pv.enums
        try:
            self.endpoint = PyverbsEndpoint(
                self.cmid, self.peer, send_depth=send_depth, recv_depth=recv_depth,
                poll_mode=self.listener.poll_mode, anchor=self.anchor,
            )  # fmt: skip
            # Our RDMA READs in flight: no more than the host offered (its responder resources,
            # which RDMA-CM gives as the RTS max_rd_atomic), nor the device, nor RD_ATOMIC.
            offered, _ = self.cmid.init_qp_attr(e.IBV_QPS_RTS)
            self.depth = min(
                _rd_atomic(self.cmid.context, "max_qp_init_rd_atom"), int(offered.max_rd_atomic)
            )
            self.endpoint.move(e.IBV_QPS_RTR)
            self.endpoint.move(e.IBV_QPS_RTS, max_rd_atomic=self.depth)
        except ConnectionLost:
            raise
        except Exception as exc:
            raise ConnectionLost(f"creating the queue pair failed: {exc}") from exc
        return self.endpoint

    async def accept(self, private_data: bytes) -> None:
        assert self.endpoint is not None
        pv = self.listener.pv
        try:
            param = _conn_param(
                pv, self.endpoint.qp.qp_num, private_data, resources=0, depth=self.depth
            )
            self.cmid.accept(param)
        except Exception as exc:
            raise ConnectionLost(f"RDMA accept failed: {exc}") from exc

    async def reject(self, private_data: bytes) -> None:
        if self.endpoint is not None and self.endpoint.closed:
            return  # its CM ID is gone with it (the host sees the connection fail)
        with contextlib.suppress(Exception):
            self.cmid.reject(private_data, len(private_data))
        if self.endpoint is None:
            for cm in (self.cmid, self.anchor):
                with contextlib.suppress(Exception):
                    cm.close()


class PyverbsListener:
    """An RDMA-CM listener (``nvmeof.transport.verbs.RdmaListener``): its event channel is read
    from the event loop by ``next_request``."""

    def __init__(self, host: str, port: int = 4420, *, poll_mode: bool = False) -> None:
        self.pv = pv = load_pyverbs()
        require_device()
        ce = pv.cm_enums
        self.host = host
        self.port = port
        self.poll_mode = poll_mode
        self._events = _CmEvents(pv)
        self.cmid = pv.cmid.CMID(self._events.channel)
        info = pv.cmid.AddrInfo(
            src=host, src_service=str(port), port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE
        )
        try:
            with _FD_LOCK:  # may open the device (its async event descriptor)
                self.cmid.bind_addr(info)
            self.cmid.listen(128)
        except Exception as exc:
            self.cmid.close()
            self._events.close()
            raise RdmaUnavailable(f"cannot listen on {host}:{port} over RDMA: {exc}") from exc
        self._closed = False

    async def next_request(self) -> PyverbsConnectRequest:
        ce = self.pv.cm_enums
        while True:
            if self._closed:
                raise ConnectionLost(f"RDMA listener on {self.host}:{self.port} is closed")
            event = await self._events.next()
            kind = event.event_type
            if kind == ce.RDMA_CM_EVENT_CONNECT_REQUEST:
                data = bytes(event.private_data or b"")
                try:
                    anchor = self._anchor()
                    child = self.pv.cmid.CMID(creator=event, listen_id=anchor)
                except Exception as exc:
                    log.warning("dropping an RDMA connect request: %s", exc)
                    event.ack_cm_event()
                    continue
                event.ack_cm_event()
                return PyverbsConnectRequest(self, child, data, anchor)
            log.debug("RDMA-CM event %s", event.event_str())
            event.ack_cm_event()

    def _anchor(self) -> Any:
        """A CM ID bound to our address (port 0) for one connection to borrow its Context and
        PD from: pyverbs gives a connection's CM ID those of the ID it names as its listener, and
        closing it sets their pointers to NULL, which must not happen to the listener's."""
        pv = self.pv
        ce = pv.cm_enums
        anchor = pv.cmid.CMID(self._events.channel)
        info = pv.cmid.AddrInfo(
            src=self.host, src_service="0", port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE
        )
        with _FD_LOCK:
            anchor.bind_addr(info)
        return anchor

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.cmid.close()
        self._events.close()
