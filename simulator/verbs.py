"""A simulated RDMA verbs layer, shaped like pyverbs: ``Context``, ``PD``, ``MR``, ``CQ``, ``QP``.

Memory regions carry ``lkey``/``rkey`` and access flags; reliable-connected QPs move through
RESET -> INIT -> RTR -> RTS and post SEND/RECV, RDMA WRITE (with or without immediate) and RDMA
READ work requests; completions land on CQs as ``WC``s with the libibverbs status codes, including
remote access errors (a bad or deregistered rkey, missing access rights, out of bounds), local
protection errors, receive-length errors, RNR retries, and flushes once a QP is in the error state.
Work requests travel over ``simulator.fabric`` links: a transfer queues on the link's serialiser,
takes ``size / bandwidth`` and arrives ``latency`` later; a cut link or a crashed node moves every
QP on it to the error state (the WR in flight completes with ``RETRY_EXC_ERR``, the rest are
flushed).

The core is sans-IO: a ``VerbsFabric`` keeps a heap of events ordered by ``(time, seq)`` and runs
them when asked (``advance(now)``, ``run_until_idle()``), so tests drive it with explicit times.
Give it ``clock=anyio.current_time`` and ``await cq.wait()`` to use it from async code in virtual
time. Where pyverbs raises ``PyverbsRDMAError`` on a post, this raises ``VerbsError`` (with the
errno a provider would give).

Simplifications (documented, not hidden): one port per context, RC QPs only, no atomics or memory
windows, completions are always signalled, and a stalled link delays work requests indefinitely
(no transport retry timeout). A responder that NAKs a bad rkey moves to the error state too (as
with IBV_EVENT_QP_ACCESS_ERR), so nothing sent after the bad request is delivered.
"""

from __future__ import annotations

import collections
import enum
import errno
import heapq
import itertools
import random
from collections.abc import Callable, Sequence

import attrs

from simulator.fabric import Fabric, Link, LinkState

HEADER_BYTES = 58  # RoCEv2: Ethernet + IP + UDP + BTH (+ RETH), roughly, per message
RNR_TIMER = 655e-6  # seconds between RNR retries (min_rnr_timer 0x13 ~ 0.64 ms)


class Access(enum.IntFlag):
    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8


class WrOpcode(enum.IntEnum):
    RDMA_WRITE = 0
    RDMA_WRITE_WITH_IMM = 1
    SEND = 2
    SEND_WITH_IMM = 3
    RDMA_READ = 4


class WcOpcode(enum.IntEnum):
    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    RECV = 128
    RECV_RDMA_WITH_IMM = 129


class WcStatus(enum.IntEnum):
    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13


class QPState(enum.IntEnum):
    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    ERR = 6


class VerbsError(Exception):
    """A verb refused synchronously (pyverbs: ``PyverbsRDMAError``)."""

    def __init__(self, message: str, error: int = errno.EINVAL) -> None:
        super().__init__(f"{message} (errno {error})")
        self.errno = error


@attrs.frozen
class SGE:
    addr: int
    length: int
    lkey: int


@attrs.frozen
class SendWR:
    wr_id: int = 0
    opcode: WrOpcode = WrOpcode.SEND
    sg_list: Sequence[SGE] = ()
    remote_addr: int = 0
    rkey: int = 0
    imm_data: int = 0


@attrs.frozen
class RecvWR:
    wr_id: int = 0
    sg_list: Sequence[SGE] = ()


@attrs.frozen
class WC:
    wr_id: int
    status: WcStatus
    opcode: WcOpcode
    byte_len: int
    qp_num: int
    imm_data: int = 0


@attrs.frozen
class QPCap:
    max_send_wr: int = 128
    max_recv_wr: int = 128
    max_send_sge: int = 4
    max_recv_sge: int = 4


class VerbsFabric:
    """RDMA devices on a ``Fabric``, and the event heap that runs their work requests."""

    def __init__(self, fabric: Fabric, *, clock: Callable[[], float] | None = None) -> None:
        self.fabric = fabric
        self.clock = clock
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._qp_nums = itertools.count(0x100)
        self._qps: dict[int, QP] = {}
        self._parked: dict[int, list[Callable[[], None]]] = collections.defaultdict(list)
        self._watched: set[int] = set()
        self.on_event: Callable[[], None] | None = None  # async waiters' wake-up

    # --- time ---------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.clock is not None:
            self.advance(self.clock())

    def schedule(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (max(time, self.now), next(self._seq), action))
        if self.on_event is not None:
            self.on_event()

    def next_time(self) -> float | None:
        return self._events[0][0] if self._events else None

    def advance(self, now: float) -> None:
        """Run every event due by ``now``, in ``(time, seq)`` order."""
        while self._events and self._events[0][0] <= now:
            time, _, action = heapq.heappop(self._events)
            self.now = max(self.now, time)
            action()
        self.now = max(self.now, now)

    def run_until_idle(self, limit: float = float("inf")) -> None:
        while self._events and self._events[0][0] <= limit:
            self.advance(self._events[0][0])

    # --- links --------------------------------------------------------------------------------
    def when_up(self, link: Link, action: Callable[[], None]) -> None:
        """Run ``action`` now if the link delivers, else once it resumes."""
        if link.state is LinkState.STALLED:
            key = id(link)
            self._parked[key].append(action)
            if key not in self._watched:
                self._watched.add(key)
                link.watch(lambda: self._resume(link))
        else:
            action()

    def _resume(self, link: Link) -> None:
        if link.state is not LinkState.STALLED:
            for action in self._parked.pop(id(link), []):
                self.schedule(self.now, action)

    def register(self, qp: QP) -> int:
        num = next(self._qp_nums)
        self._qps[num] = qp
        return num

    def qp(self, num: int) -> QP | None:
        return self._qps.get(num)


class Context:
    """An RDMA device on node ``name`` (pyverbs: ``Context(name=...)``)."""

    def __init__(self, verbs: VerbsFabric, name: str) -> None:
        self.verbs = verbs
        self.name = name
        self.node = verbs.fabric.node(name)
        self.rng = random.Random(f"{verbs.fabric.seed}:rdma:{name}")
        self.mrs: dict[int, MR] = {}  # by lkey and by rkey
        self._next_addr = 0x7F00_0000_0000


class PD:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx


class MR:
    """A registered memory region (pyverbs: ``MR(pd, length, access)``)."""

    def __init__(self, pd: PD, length: int, access: Access | int, *, buf: bytearray | None = None):
        if length <= 0:
            raise VerbsError("memory region length must be positive")
        ctx = pd.ctx
        self.pd = pd
        self.length = length
        self.access = Access(access)
        self.buf = memoryview(buf if buf is not None else bytearray(length))[:length]
        self.addr = ctx._next_addr
        ctx._next_addr += (length + 0xFFFF) & ~0xFFF  # page aligned, with a guard gap
        while True:  # keys are random (not guessable) but a function of the seed
            self.lkey = ctx.rng.getrandbits(32)
            self.rkey = ctx.rng.getrandbits(32)
            if self.lkey not in ctx.mrs and self.rkey not in ctx.mrs and self.lkey != self.rkey:
                break
        ctx.mrs[self.lkey] = self
        ctx.mrs[self.rkey] = self
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview, length: int, offset: int = 0) -> None:
        self.buf[offset : offset + length] = memoryview(data)[:length]

    def read(self, length: int, offset: int = 0) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def close(self) -> None:
        """Deregister: both keys stop working at once."""
        if not self.closed:
            self.closed = True
            self.pd.ctx.mrs.pop(self.lkey, None)
            self.pd.ctx.mrs.pop(self.rkey, None)

    def span(self, addr: int, length: int) -> memoryview | None:
        """The bytes at ``[addr, addr + length)`` if they lie inside this region."""
        start = addr - self.addr
        if start < 0 or length < 0 or start + length > self.length:
            return None
        return self.buf[start : start + length]


class CQ:
    """A completion queue (pyverbs: ``CQ(ctx, cqe)``; ``poll(n) -> (count, [WC])``)."""

    def __init__(self, ctx: Context, cqe: int) -> None:
        self.ctx = ctx
        self.cqe = cqe
        self._entries: collections.deque[WC] = collections.deque()
        self.overrun = False

    def push(self, wc: WC) -> None:
        if len(self._entries) >= self.cqe:
            self.overrun = True  # a real device raises IBV_EVENT_CQ_ERR; we keep the WC
        self._entries.append(wc)

    def poll(self, num_entries: int = 1) -> tuple[int, list[WC]]:
        self.ctx.verbs.sync()
        out = [self._entries.popleft() for _ in range(min(num_entries, len(self._entries)))]
        return len(out), out

    async def wait(self, num_entries: int = 1) -> list[WC]:
        """Poll until at least one completion is there, sleeping in (virtual) time between."""
        import anyio

        verbs = self.ctx.verbs
        while True:
            _, wcs = self.poll(num_entries)
            if wcs:
                return wcs
            wake = anyio.Event()
            verbs.on_event = wake.set
            due = verbs.next_time()
            with anyio.CancelScope(deadline=float("inf") if due is None else due):
                await wake.wait()
            verbs.on_event = None


@attrs.frozen
class QPInitAttr:
    send_cq: CQ
    recv_cq: CQ
    cap: QPCap = QPCap()
    rnr_retry: int = 7  # 7: retry for ever


@attrs.define
class _Pending:
    wr: SendWR
    done: bool = False


class QP:
    """A reliable-connected queue pair."""

    def __init__(self, pd: PD, init_attr: QPInitAttr) -> None:
        self.pd = pd
        self.ctx = pd.ctx
        self.verbs = pd.ctx.verbs
        self.attr = init_attr
        self.qp_num = self.verbs.register(self)
        self.state = QPState.RESET
        self.remote: QP | None = None
        self.link: Link | None = None
        self._recvs: collections.deque[RecvWR] = collections.deque()
        self._sends: collections.deque[_Pending] = collections.deque()
        self._last_arrival = 0.0

    # --- state --------------------------------------------------------------------------------
    def to_init(self) -> None:
        self._move(QPState.RESET, QPState.INIT)

    def to_rtr(self, dest_node: str, dest_qp_num: int) -> None:
        self._move(QPState.INIT, QPState.RTR)
        remote = self.verbs.qp(dest_qp_num)
        if remote is None or remote.ctx.name != dest_node:
            self.state = QPState.INIT
            raise VerbsError(f"no QP {dest_qp_num:#x} on {dest_node}", errno.EINVAL)
        self.remote = remote
        self.link = self.verbs.fabric.link(self.ctx.name, dest_node)
        self.link.attach(self)

    def to_rts(self) -> None:
        self._move(QPState.RTR, QPState.RTS)

    def connect(self, other: QP) -> None:
        """Bring both QPs to RTS, each pointing at the other (what RDMA CM does)."""
        for qp, peer in ((self, other), (other, self)):
            if qp.state is QPState.RESET:
                qp.to_init()
            qp.to_rtr(peer.ctx.name, peer.qp_num)
        self.to_rts()
        other.to_rts()

    def _move(self, expected: QPState, new: QPState) -> None:
        if self.state is not expected:
            raise VerbsError(f"QP {self.qp_num:#x}: {self.state.name} -> {new.name} is invalid")
        self.state = new

    def to_error(self, first: WcStatus = WcStatus.WR_FLUSH_ERR) -> None:
        """Move to ERR: the oldest outstanding send completes with ``first``, the rest flush."""
        if self.state is QPState.ERR:
            return
        self.state = QPState.ERR
        if self.link is not None:
            self.link.detach(self)
        status = first
        while self._sends:
            pending = self._sends.popleft()
            self._complete_send(pending, status, 0)
            status = WcStatus.WR_FLUSH_ERR
        while self._recvs:
            wr = self._recvs.popleft()
            self.attr.recv_cq.push(
                WC(wr.wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV, 0, self.qp_num)
            )

    # Breakable, for the fabric's faults
    def lose(self, reason: str) -> None:
        self.to_error(WcStatus.RETRY_EXC_ERR)

    def wake(self) -> None:
        pass

    # --- posting ------------------------------------------------------------------------------
    def post_recv(self, wr: RecvWR) -> None:
        self.verbs.sync()
        if self.state is QPState.RESET:
            raise VerbsError(f"QP {self.qp_num:#x} is in RESET")
        if len(wr.sg_list) > self.attr.cap.max_recv_sge:
            raise VerbsError("too many scatter entries", errno.EINVAL)
        if len(self._recvs) >= self.attr.cap.max_recv_wr:
            raise VerbsError("receive queue full", errno.ENOMEM)
        if self.state is QPState.ERR:
            self.attr.recv_cq.push(
                WC(wr.wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV, 0, self.qp_num)
            )
            return
        self._recvs.append(wr)

    def post_send(self, wr: SendWR) -> None:
        self.verbs.sync()
        if self.state not in (QPState.RTS, QPState.ERR):
            raise VerbsError(f"QP {self.qp_num:#x} is in {self.state.name}, not RTS")
        if len(wr.sg_list) > self.attr.cap.max_send_sge:
            raise VerbsError("too many gather entries", errno.EINVAL)
        if len(self._sends) >= self.attr.cap.max_send_wr:
            raise VerbsError("send queue full", errno.ENOMEM)
        pending = _Pending(wr)
        self._sends.append(pending)
        if self.state is QPState.ERR:
            self._sends.pop()
            self._complete_send(pending, WcStatus.WR_FLUSH_ERR, 0)
            return
        needs = Access.LOCAL_WRITE if wr.opcode is WrOpcode.RDMA_READ else Access(0)
        local = _resolve(self.ctx, self.pd, wr.sg_list, needs)
        if local is None:
            self.verbs.schedule(self.verbs.now, lambda: self._fail(pending, WcStatus.LOC_PROT_ERR))
            return
        if wr.opcode is WrOpcode.RDMA_READ:
            size = sum(s.length for s in wr.sg_list)
            self._transmit(HEADER_BYTES, lambda: self._on_read_request(pending, local, size))
        else:
            payload = bytes(bytearray().join(local))  # the NIC's DMA read of the gather list
            self._transmit(HEADER_BYTES + len(payload), lambda: self._on_arrival(pending, payload))

    # --- the wire -----------------------------------------------------------------------------
    def _transmit(self, size: int, action: Callable[[], None], *, reverse: bool = False) -> None:
        assert self.remote is not None
        assert self.link is not None
        src, dst = self.ctx.name, self.remote.ctx.name
        if reverse:
            src, dst = dst, src
        link = self.link
        verbs = self.verbs

        def send() -> None:
            arrival = link.direction(src, dst).schedule(verbs.now, size)
            if not reverse:
                arrival = max(arrival, self._last_arrival)  # RC delivers in order
                self._last_arrival = arrival
            verbs.schedule(arrival, lambda: verbs.when_up(link, action))

        verbs.when_up(link, send)

    def _fail(self, pending: _Pending, status: WcStatus) -> None:
        if self.state is QPState.ERR or pending.done:
            return
        self._sends.remove(pending)
        self._complete_send(pending, status, 0)
        self.to_error()

    def _complete_send(self, pending: _Pending, status: WcStatus, byte_len: int) -> None:
        pending.done = True
        opcode = {
            WrOpcode.RDMA_WRITE: WcOpcode.RDMA_WRITE,
            WrOpcode.RDMA_WRITE_WITH_IMM: WcOpcode.RDMA_WRITE,
            WrOpcode.SEND: WcOpcode.SEND,
            WrOpcode.SEND_WITH_IMM: WcOpcode.SEND,
            WrOpcode.RDMA_READ: WcOpcode.RDMA_READ,
        }[pending.wr.opcode]
        self.attr.send_cq.push(WC(pending.wr.wr_id, status, opcode, byte_len, self.qp_num))

    def _acked(self, pending: _Pending, status: WcStatus, byte_len: int = 0) -> None:
        """The responder's ACK (or NAK) for ``pending`` has come back."""

        def back() -> None:
            if self.state is QPState.ERR or pending.done:
                return
            if status is not WcStatus.SUCCESS:
                self._fail(pending, status)
                return
            self._sends.remove(pending)
            self._complete_send(pending, status, byte_len)

        self._transmit(HEADER_BYTES, back, reverse=True)

    def _on_arrival(self, pending: _Pending, payload: bytes, rnr_left: int | None = None) -> None:
        """A SEND or WRITE has reached the responder."""
        remote = self.remote
        if self.state is QPState.ERR or pending.done or remote is None:
            return
        if remote.state not in (QPState.RTR, QPState.RTS) or not remote.ctx.node.up:
            return  # nobody answers: the requester's link fault handling decides
        wr = pending.wr
        opcode = wr.opcode
        if opcode in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM):
            target = _remote_span(
                remote, wr.rkey, wr.remote_addr, len(payload), Access.REMOTE_WRITE
            )
            if target is None:
                remote.to_error()  # the responder's QP fails too (IBV_EVENT_QP_ACCESS_ERR)
                self._acked(pending, WcStatus.REM_ACCESS_ERR)
                return
            if opcode is WrOpcode.RDMA_WRITE:
                target[:] = payload
                self._acked(pending, WcStatus.SUCCESS, len(payload))
                return
        # SEND, SEND_WITH_IMM and WRITE_WITH_IMM consume a receive.
        if not remote._recvs:
            retries = self.attr.rnr_retry if rnr_left is None else rnr_left
            if retries == 0:
                self._fail(pending, WcStatus.RNR_RETRY_EXC_ERR)
                return
            left = retries if retries == 7 else retries - 1
            self.verbs.schedule(
                self.verbs.now + RNR_TIMER, lambda: self._on_arrival(pending, payload, left)
            )
            return
        recv = remote._recvs.popleft()
        imm = wr.imm_data if opcode is not WrOpcode.SEND else 0
        if opcode is WrOpcode.RDMA_WRITE_WITH_IMM:
            assert target is not None
            target[:] = payload
            remote.attr.recv_cq.push(
                WC(recv.wr_id, WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, len(payload),
                   remote.qp_num, imm)
            )  # fmt: skip
            self._acked(pending, WcStatus.SUCCESS, len(payload))
            return
        views = _resolve(remote.ctx, remote.pd, recv.sg_list, Access.LOCAL_WRITE)
        if views is None or sum(len(v) for v in views) < len(payload):
            status = WcStatus.LOC_PROT_ERR if views is None else WcStatus.LOC_LEN_ERR
            remote.attr.recv_cq.push(WC(recv.wr_id, status, WcOpcode.RECV, 0, remote.qp_num))
            remote.to_error()
            self._acked(
                pending,
                WcStatus.REM_INV_REQ_ERR if views is not None else WcStatus.REM_OP_ERR,
            )
            return
        _scatter(payload, views)
        remote.attr.recv_cq.push(
            WC(recv.wr_id, WcStatus.SUCCESS, WcOpcode.RECV, len(payload), remote.qp_num, imm)
        )
        self._acked(pending, WcStatus.SUCCESS, len(payload))

    def _on_read_request(self, pending: _Pending, local: list[memoryview], size: int) -> None:
        remote = self.remote
        if self.state is QPState.ERR or pending.done or remote is None or not remote.ctx.node.up:
            return
        wr = pending.wr
        source = _remote_span(remote, wr.rkey, wr.remote_addr, size, Access.REMOTE_READ)
        if source is None:
            remote.to_error()  # the responder's QP fails too (IBV_EVENT_QP_ACCESS_ERR)
            self._acked(pending, WcStatus.REM_ACCESS_ERR)
            return
        data = bytes(source)  # the responder's DMA read, at the time the request arrives

        def response() -> None:
            if self.state is QPState.ERR or pending.done:
                return
            _scatter(data, local)
            self._sends.remove(pending)
            self._complete_send(pending, WcStatus.SUCCESS, size)

        self._transmit(HEADER_BYTES + size, response, reverse=True)


def _resolve(ctx: Context, pd: PD, sges: Sequence[SGE], needs: Access) -> list[memoryview] | None:
    """The local buffers a scatter/gather list names, or None on a protection error."""
    views = []
    for sge in sges:
        mr = ctx.mrs.get(sge.lkey)
        if mr is None or mr.lkey != sge.lkey or mr.pd is not pd or (mr.access & needs) != needs:
            return None
        span = mr.span(sge.addr, sge.length)
        if span is None:
            return None
        views.append(span)
    return views


def _remote_span(qp: QP, rkey: int, addr: int, length: int, needs: Access) -> memoryview | None:
    mr = qp.ctx.mrs.get(rkey)
    if mr is None or mr.rkey != rkey or mr.pd is not qp.pd or not (mr.access & needs):
        return None
    return mr.span(addr, length)


def _scatter(data: bytes, views: Sequence[memoryview]) -> None:
    offset = 0
    for view in views:
        n = min(len(view), len(data) - offset)
        view[:n] = data[offset : offset + n]
        offset += n
        if offset >= len(data):
            break
