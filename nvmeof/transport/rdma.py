"""NVMe/RDMA queue channels over the ``Endpoint`` verbs interface (pyverbs or the simulator).

Capsules move by SEND into receive buffers posted ahead: the host posts one 16-byte receive per
response it may get, the controller one command-capsule buffer (SQE + in-capsule data) per
submission queue entry. Data moves against keyed SGLs: the controller RDMA READs a command's
host-to-controller data from the host's registered buffer and RDMA WRITEs controller-to-host data
straight into it, then SENDs the CQE (RC ordering lands the data first), with Invalidate where the
host's SGL asks for it (0x4F) and the endpoint can.

Completions are driven from the event loop: one task at a time waits on the endpoint's completion
queue (``Endpoint.wait``: the completion channel, or polling if the backend is set to), and
dispatches every completion it gets. A failed work request (remote access error, retry exceeded,
flush) is connection-fatal, as in SPDK and nvmet-rdma: the commands in flight fail with
``ConnectionLost``, other queues are unaffected.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import struct
from collections.abc import Callable, Sequence

import anyio
import attrs

from nvmeof.errors import CommandError, ConnectionLost
from nvmeof.rdma.capsule import (
    CQE_SIZE,
    MAX_KEYED_LENGTH,
    SQE_SIZE,
    CapsuleError,
    in_capsule_sgl,
    is_keyed,
    keyed_sgl,
    null_sgl,
    parse_command_capsule,
    parse_response_capsule,
    wants_invalidate,
)
from nvmeof.rdma.cm import AcceptData, ConnectRequestData, PrivateDataError, RejectData
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.sgl import SglDescriptor
from nvmeof.spec.status import GenericStatus, Status
from nvmeof.transport.base import Buffer, Request
from nvmeof.transport.mr_cache import MrCache
from nvmeof.transport.verbs import (
    Access,
    ConnectionRejected,
    Endpoint,
    MemoryRegion,
    RdmaConnector,
    RegistrationError,
    Sge,
    WcStatus,
    WorkCompletion,
    status_name,
)

log = logging.getLogger("nvmeof.transport.rdma")

DEFAULT_PORT = 4420
HOST_IN_CAPSULE_ROOM = 8192  # the most in-capsule data a host send buffer holds
REGISTER_MIN = 16384  # smaller buffers are copied through a registered bounce buffer
_CID = struct.Struct("<H")

_TAG_SHIFT = 40
_RECV, _SEND, _READ, _WRITE = (1 << _TAG_SHIFT, 2 << _TAG_SHIFT, 3 << _TAG_SHIFT, 4 << _TAG_SHIFT)
_INDEX = (1 << _TAG_SHIFT) - 1


def _tag(wr_id: int) -> int:
    return wr_id & ~_INDEX


class _Pump:
    """One task waits on the completion queue at a time; the others wait for it to get some."""

    def __init__(self, endpoint: Endpoint, handle: Callable[[WorkCompletion], None]) -> None:
        self._endpoint = endpoint
        self._handle = handle
        self._busy = False
        self._progress = anyio.Event()

    def drain(self) -> None:
        for wc in self._endpoint.poll():
            self._handle(wc)

    async def step(self) -> None:
        if self._busy:
            await self._progress.wait()
            return
        self._busy = True
        try:
            for wc in await self._endpoint.wait():
                self._handle(wc)
        finally:
            self._busy = False
            self._progress.set()
            self._progress = anyio.Event()


class _Ring:
    """``count`` equal slots in one registered buffer."""

    def __init__(self, endpoint: Endpoint, count: int, size: int, access: Access) -> None:
        self.count = count
        self.size = size
        self.buf = bytearray(count * size)
        self.view = memoryview(self.buf)
        self.mr = endpoint.register(self.view, access)

    def slot(self, index: int) -> memoryview:
        return self.view[index * self.size : (index + 1) * self.size]

    def sge(self, index: int, length: int | None = None) -> Sge:
        return Sge(self.mr, index * self.size, self.size if length is None else length)

    def close(self) -> None:
        self.mr.close()


def _lost_reason(wc: WorkCompletion) -> str:
    if wc.status == WcStatus.WR_FLUSH_ERR:
        return "connection closed (work requests flushed)"
    return f"{status_name(wc.status)} on a work request"


# --- host --------------------------------------------------------------------------------------
@attrs.define(eq=False)
class _HostCommand:
    into: Sequence[memoryview] = ()
    bounce: memoryview | None = None  # the controller's data landed here: scatter to ``into``
    own_mr: MemoryRegion | None = None  # registered for this command alone (invalidate)
    cached: Buffer | None = None  # the caller buffer whose cached region the command uses


class RdmaHostChannel:
    trtype = "rdma"

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        depth: int,
        cache: MrCache | None = None,
        invalidate: bool = False,
    ) -> None:
        self._ep = endpoint
        self.peer = endpoint.peer
        self.depth = depth
        self.invalidate = invalidate and endpoint.remote_invalidate
        self._sends = _Ring(endpoint, depth, SQE_SIZE + HOST_IN_CAPSULE_ROOM, Access.LOCAL_WRITE)
        self._recvs = _Ring(endpoint, depth, CQE_SIZE, Access.LOCAL_WRITE)
        self._free_sends = list(range(depth - 1, -1, -1))
        self._responses: collections.deque[Completion] = collections.deque()
        self._commands: dict[int, _HostCommand] = {}
        self._bounces: dict[int, tuple[bytearray, MemoryRegion]] = {}
        self._owns_cache = cache is None
        self.cache = cache if cache is not None else MrCache(endpoint.register)
        self._pump = _Pump(endpoint, self._on_completion)
        self._lost: ConnectionLost | None = None
        self._max_in_capsule = 0
        self.invalidated = 0  # responses that came as Send with Invalidate
        for i in range(depth):
            endpoint.post_recv(_RECV | i, self._recvs.sge(i))

    @property
    def max_in_capsule_data(self) -> int:
        return self._max_in_capsule

    @max_in_capsule_data.setter
    def max_in_capsule_data(self, size: int) -> None:
        self._max_in_capsule = max(0, min(size, HOST_IN_CAPSULE_ROOM))

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        connector: RdmaConnector,
        qid: int,
        depth: int,
        cntlid: int = 0,
        cache: MrCache | None = None,
        invalidate: bool = False,
    ) -> RdmaHostChannel:
        """Connect one queue: RDMA-CM with the NVMe/RDMA private data (HRQSIZE = ``depth``
        responses we can take, HSQSIZE = ``depth - 1``)."""
        private = ConnectRequestData(qid=qid, hrqsize=depth, hsqsize=depth - 1, cntlid=cntlid)
        try:
            endpoint, accept = await connector(
                host, port, private.pack(), send_depth=depth, recv_depth=depth
            )
        except ConnectionRejected as exc:
            reason = str(exc)
            if exc.private_data:
                with contextlib.suppress(PrivateDataError):
                    reason = f"{RejectData.unpack(exc.private_data).describe()}"
            raise ConnectionRejected(
                f"RDMA connect to {host}:{port} (qid {qid}) rejected: {reason}", exc.private_data
            ) from None
        try:
            channel = cls(endpoint, depth=depth, cache=cache, invalidate=invalidate)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await endpoint.aclose()
            raise
        if accept:
            try:
                crqsize = AcceptData.unpack(accept).crqsize
            except PrivateDataError as exc:
                log.warning("[%s] bad accept private data: %s", channel.peer, exc)
            else:
                if crqsize and crqsize < depth:
                    log.info("[%s] controller takes %d capsules, not %d", host, crqsize, depth)
        return channel

    # --- completions ---------------------------------------------------------------------------
    def _on_completion(self, wc: WorkCompletion) -> None:
        tag, index = _tag(wc.wr_id), wc.wr_id & _INDEX
        if wc.status != WcStatus.SUCCESS:
            if self._lost is None:
                if wc.status != WcStatus.WR_FLUSH_ERR:
                    log.error("[%s] %s", self.peer, _lost_reason(wc))
                self._lost = ConnectionLost(f"queue to {self.peer}: {_lost_reason(wc)}")
            return
        if tag == _SEND:
            self._free_sends.append(index)
        elif tag == _RECV:
            try:
                completion = parse_response_capsule(self._recvs.slot(index), wc.byte_len)
            except CapsuleError as exc:
                self._lost = ConnectionLost(f"queue to {self.peer}: {exc}")
                return
            if self._lost is None:
                self._ep.post_recv(_RECV | index, self._recvs.sge(index))
            self._finish(completion, wc.invalidated_rkey)
            self._responses.append(completion)

    def _finish(self, completion: Completion, invalidated: int | None) -> None:
        state = self._commands.pop(completion.cid, None)
        if state is None:
            return
        if state.bounce is not None and completion.status.success:
            offset = 0
            for view in state.into:
                n = len(view)
                view[:] = state.bounce[offset : offset + n]
                offset += n
        if state.own_mr is not None:
            if invalidated is not None and invalidated == state.own_mr.rkey:
                self.invalidated += 1
            state.own_mr.close()  # invalidated remotely, or here (as the host must otherwise)

    def next_completion_nowait(self) -> Completion | None:
        return self._responses.popleft() if self._responses else None

    async def next_completion(self) -> Completion:
        while True:
            if self._responses:
                return self._responses.popleft()
            if self._lost is not None:
                await self._fail()
            try:
                await self._pump.step()
            except ConnectionLost as exc:
                self._lost = self._lost or exc

    async def _fail(self) -> None:
        assert self._lost is not None
        with anyio.CancelScope(shield=True):
            await self._ep.aclose()
        raise self._lost

    # --- submission ----------------------------------------------------------------------------
    async def _send_slot(self) -> int:
        while not self._free_sends:
            self._pump.drain()
            if self._free_sends:
                break
            if self._lost is not None:
                await self._fail()
            await self._pump.step()
        return self._free_sends.pop()

    async def submit(
        self,
        command: Command,
        *,
        cid: int,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
    ) -> None:
        if self._lost is not None:
            raise self._lost
        slot = await self._send_slot()
        view = self._sends.slot(slot)
        command.pack_into(view, dptr=False)  # the SGL is this transport's, packed below
        _CID.pack_into(view, 2, cid)
        state = _HostCommand(into=into)
        length = SQE_SIZE
        try:
            if out:
                total = sum(len(b) for b in out)
                if total <= self._max_in_capsule:
                    offset = SQE_SIZE
                    for buf in out:
                        view[offset : offset + len(buf)] = buf
                        offset += len(buf)
                    length = offset
                    desc = in_capsule_sgl(total)
                else:
                    desc = self._keyed(cid, state, out, Access.REMOTE_READ, receive=False)
            elif into and sum(len(v) for v in into):
                access = Access.LOCAL_WRITE | Access.REMOTE_WRITE
                desc = self._keyed(cid, state, into, access, receive=True)
            else:
                desc = null_sgl()
        except BaseException:
            self._free_sends.append(slot)
            raise
        desc.pack_into(view, 24)
        self._commands[cid] = state
        try:
            self._ep.post_send(_SEND | slot, [self._sends.sge(slot, length)])
        except ConnectionLost as exc:
            self._commands.pop(cid, None)
            self._lost = self._lost or exc
            raise
        await anyio.lowlevel.checkpoint()

    def _keyed(
        self,
        cid: int,
        state: _HostCommand,
        buffers: Sequence[Buffer],
        access: Access,
        *,
        receive: bool,
    ) -> SglDescriptor:
        total = sum(len(b) for b in buffers)
        if total > MAX_KEYED_LENGTH:
            raise ValueError(f"{total} bytes exceed one keyed SGL ({MAX_KEYED_LENGTH})")
        if self.invalidate:
            target = memoryview(buffers[0]) if len(buffers) == 1 else None
            if target is None or (receive and target.readonly):
                target = memoryview(bytearray(total))
                self._stage(state, buffers, target, receive)
            try:
                mr = self._ep.register(target, access)
            except RegistrationError:
                target = memoryview(bytearray(total))
                self._stage(state, buffers, target, receive)
                mr = self._ep.register(target, access)
            state.own_mr = mr
            return keyed_sgl(mr.addr, total, mr.rkey, invalidate=True)
        if len(buffers) == 1 and total >= REGISTER_MIN:
            try:
                sge = self.cache.lookup(buffers[0], access)
            except RegistrationError:
                pass
            else:
                state.cached = buffers[0]
                return keyed_sgl(sge.mr.addr + sge.offset, total, sge.mr.rkey)
        buf, mr = self._bounce(cid, total, access)
        self._stage(state, buffers, memoryview(buf)[:total], receive)
        return keyed_sgl(mr.addr, total, mr.rkey)

    def _stage(
        self, state: _HostCommand, buffers: Sequence[Buffer], target: memoryview, receive: bool
    ) -> None:
        if receive:
            state.bounce = target
            return
        offset = 0
        for buf in buffers:
            target[offset : offset + len(buf)] = buf
            offset += len(buf)

    def _bounce(self, cid: int, size: int, access: Access) -> tuple[bytearray, MemoryRegion]:
        """A registered staging buffer for one CID, grown on demand and kept."""
        found = self._bounces.get(cid)
        if found is not None and len(found[0]) >= size:
            return found
        if found is not None:
            found[1].close()
        buf = bytearray(max(size, 4096))
        everything = Access.LOCAL_WRITE | Access.REMOTE_READ | Access.REMOTE_WRITE
        mr = self._ep.register(memoryview(buf), everything | access)
        self._bounces[cid] = (buf, mr)
        return buf, mr

    def forget(self, cid: int) -> None:
        """Give up on ``cid``: its buffers are deregistered, so late data cannot land in them (a
        late RDMA transfer then fails at the controller, which ends this queue)."""
        state = self._commands.pop(cid, None)
        if state is None:
            return
        if state.cached is not None:
            self.cache.forget(state.cached)
        if state.own_mr is not None:
            state.own_mr.close()
        bounce = self._bounces.pop(cid, None)
        if bounce is not None:
            bounce[1].close()

    async def aclose(self) -> None:
        if self._lost is None:
            self._lost = ConnectionLost(f"queue to {self.peer} closed")
        with anyio.CancelScope(shield=True):
            await self._ep.aclose()
        for _, mr in self._bounces.values():
            mr.close()
        self._bounces.clear()
        if self._owns_cache:
            self.cache.close()
        self._sends.close()
        self._recvs.close()


# --- controller --------------------------------------------------------------------------------
class _Pull:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


class RdmaControllerChannel:
    """The controller side of one NVMe/RDMA queue: built on an endpoint before the CM accept, so
    its capsule receives are posted by the time the host may send."""

    trtype = "rdma"

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        recv_depth: int,
        send_depth: int,
        in_capsule_size: int,
    ) -> None:
        self._ep = endpoint
        self.peer = endpoint.peer
        self._recvs = _Ring(endpoint, recv_depth, SQE_SIZE + in_capsule_size, Access.LOCAL_WRITE)
        self._resps = _Ring(endpoint, send_depth, CQE_SIZE, Access.LOCAL_WRITE)
        self._free_resps = list(range(send_depth - 1, -1, -1))
        self._resp_freed = anyio.Event()
        self._held: dict[Request, int] = {}
        self._pulls: dict[int, _Pull] = {}
        self._writes: dict[int, list[MemoryRegion]] = {}
        self._ids = itertools.count()
        self._max_in_capsule = in_capsule_size
        self._closed = False
        self._lost: str | None = None
        self._on_request: Callable[[Request], None] | None = None
        self.invalidations_sent = 0
        for i in range(recv_depth):
            endpoint.post_recv(_RECV | i, self._recvs.sge(i))

    def set_max_in_capsule_data(self, size: int) -> None:
        self._max_in_capsule = min(size, self._recvs.size - SQE_SIZE)

    async def run(self, on_request: Callable[[Request], None]) -> None:
        self._on_request = on_request
        try:
            while self._lost is None and not self._closed:
                for wc in await self._ep.wait():
                    self._on_completion(wc)
        except ConnectionLost as exc:
            self._lost = str(exc)
        finally:
            if self._lost is not None:
                log.info("[%s] %s", self.peer, self._lost)
            self._fail_pulls()
            with anyio.CancelScope(shield=True):
                await self.aclose()

    def _on_completion(self, wc: WorkCompletion) -> None:
        tag, index = _tag(wc.wr_id), wc.wr_id & _INDEX
        if wc.status != WcStatus.SUCCESS:
            if self._lost is None:
                self._lost = _lost_reason(wc)
                if wc.status != WcStatus.WR_FLUSH_ERR:
                    log.warning("[%s] %s: closing the queue", self.peer, self._lost)
            pull = self._pulls.pop(wc.wr_id, None)
            if pull is not None:
                pull.error = ConnectionLost(f"RDMA READ from {self.peer}: {_lost_reason(wc)}")
                pull.done.set()
            return
        if tag == _RECV:
            self._on_capsule(index, wc.byte_len)
        elif tag == _READ:
            pull = self._pulls.pop(wc.wr_id, None)
            if pull is not None:
                pull.done.set()
        elif tag == _WRITE:
            for mr in self._writes.pop(wc.wr_id, ()):
                mr.close()
        elif tag == _SEND:
            self._free_resps.append(index)
            self._resp_freed.set()

    def _on_capsule(self, slot: int, length: int) -> None:
        try:
            capsule = parse_command_capsule(self._recvs.slot(slot), length)
        except CapsuleError as exc:
            self._lost = f"bad command capsule: {exc}"
            return
        command = Command.unpack_from(capsule.sqe)
        in_capsule: memoryview | None = None
        desc = command.dptr
        if desc.identifier == 0x01:  # in-capsule data at offset ``address``
            data = capsule.data if capsule.data is not None else memoryview(b"")
            in_capsule = data[desc.address : desc.address + desc.length]
        request = Request(command, in_capsule)
        self._held[request] = slot
        assert self._on_request is not None
        self._on_request(request)

    def _fail_pulls(self) -> None:
        for pull in self._pulls.values():
            pull.error = ConnectionLost(f"connection to {self.peer} closed during data transfer")
            pull.done.set()
        self._pulls.clear()

    async def pull(self, request: Request, into: memoryview) -> None:
        if request.in_capsule is not None:
            if len(request.in_capsule) < len(into):
                raise _short_data()
            into[:] = request.in_capsule[: len(into)]
            return
        desc = request.command.dptr
        if not is_keyed(desc):
            raise CommandError(
                Status.generic(GenericStatus.SGL_DESCRIPTOR_TYPE_INVALID),
                f"SGL identifier 0x{desc.identifier:02x} does not name host memory",
            )
        if desc.length < len(into):
            raise _short_data()
        if not len(into):
            return
        if self._closed or self._lost is not None:
            raise ConnectionLost(f"connection to {self.peer} closed")
        target = into
        try:
            mr = self._ep.register(into, Access.LOCAL_WRITE)
        except RegistrationError:
            target = memoryview(bytearray(len(into)))
            mr = self._ep.register(target, Access.LOCAL_WRITE)
        wr_id = _READ | next(self._ids)
        pull = _Pull()
        self._pulls[wr_id] = pull
        try:
            self._ep.post_read(wr_id, [Sge(mr, 0, len(into))], desc.address, desc.key)
            await pull.done.wait()
        finally:
            self._pulls.pop(wr_id, None)
            mr.close()
        if pull.error is not None:
            raise pull.error
        if target is not into:
            into[:] = target

    async def complete(
        self, request: Request, completion: Completion, data: Sequence[Buffer] = ()
    ) -> None:
        slot = self._held.pop(request, None)
        if self._closed or self._lost is not None:
            return
        desc = request.command.dptr
        try:
            if data and sum(len(b) for b in data):
                if is_keyed(desc):
                    self._write(data, desc.address, desc.key)
                else:
                    log.warning(
                        "[%s] cid %d: read data but no keyed SGL", self.peer, completion.cid
                    )
                    completion = attrs.evolve(
                        completion, status=Status.generic(GenericStatus.SGL_DESCRIPTOR_TYPE_INVALID)
                    )
            while not self._free_resps:
                if self._closed or self._lost is not None:
                    return
                self._resp_freed = anyio.Event()
                await self._resp_freed.wait()
            resp = self._free_resps.pop()
            completion.pack_into(self._resps.slot(resp))
            if slot is not None:
                self._ep.post_recv(_RECV | slot, self._recvs.sge(slot))
                slot = None
            invalidate = None
            if is_keyed(desc) and wants_invalidate(desc) and self._ep.remote_invalidate:
                invalidate = desc.key
                self.invalidations_sent += 1
            self._ep.post_send(_SEND | resp, [self._resps.sge(resp)], invalidate_rkey=invalidate)
        except ConnectionLost as exc:
            self._lost = self._lost or str(exc)
            await self.aclose()
        finally:
            if slot is not None and not self._closed and self._lost is None:
                self._ep.post_recv(_RECV | slot, self._recvs.sge(slot))

    def _write(self, data: Sequence[Buffer], address: int, rkey: int) -> None:
        mrs: list[MemoryRegion] = []
        sges: list[Sge] = []
        views = [memoryview(b) for b in data if len(b)]
        if len(views) > self._ep.max_sge:
            views = [memoryview(bytearray().join(views))]
        for view in views:
            try:
                mr = self._ep.register(view, Access(0))
            except RegistrationError:
                view = memoryview(bytearray(view))
                mr = self._ep.register(view, Access(0))
            mrs.append(mr)
            sges.append(Sge(mr, 0, len(view)))
        wr_id = _WRITE | next(self._ids)
        self._writes[wr_id] = mrs
        self._ep.post_write(wr_id, sges, address, rkey)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._fail_pulls()
            with anyio.CancelScope(shield=True):
                await self._ep.aclose()
            for mrs in self._writes.values():
                for mr in mrs:
                    mr.close()
            self._writes.clear()
            self._recvs.close()
            self._resps.close()


def _short_data() -> CommandError:
    return CommandError(
        Status.generic(GenericStatus.DATA_SGL_LENGTH_INVALID), "data shorter than the command needs"
    )
