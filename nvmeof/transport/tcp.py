"""NVMe/TCP queue channels: the sans-IO connections of ``nvmeof.tcp`` over non-blocking sockets."""

from __future__ import annotations

import contextlib
import logging
import math
import struct
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel

from nvmeof.errors import CommandError, ConnectionLost, PduError
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.sgl import SglIdentifier, pack_unkeyed_into
from nvmeof.spec.status import GenericStatus, Status
from nvmeof.tcp.connection import (
    CommandReceived,
    ConnectionClosed,
    ConnectionParams,
    ControllerConnection,
    DataDigestError,
    DataReceived,
    HostConnection,
    ICReqReceived,
    ICRespReceived,
    InCapsuleAllocator,
    ResponseReceived,
    TermReqReceived,
)
from nvmeof.tcp.machine import PduConnection
from nvmeof.transport.base import Buffer, ByteStream, HostConnector, Request
from nvmeof.transport.sockets import open_tcp

log = logging.getLogger("nvmeof.transport.tcp")

ADMIN_IN_CAPSULE_DATA = 8192  # admin queue and fabrics commands, as Linux and SPDK
DEFAULT_PORT = 4420
# Bytes a connection parses per receive: 32 commands of 4 KiB in flight are ~135 KiB of PDUs, and
# the batch one recv brings is the batch one sendmsg answers.
RECEIVE_BUFFER = 256 * 1024
# Completions a controller queues before it sends them, when one receive brought more commands.
# Answering a 32-command batch in one send makes host and target take turns (each idles while
# the other works through the batch); sending the first 8 at once lets the host start on them
# while the rest are served (4 KiB x32 here: gets 19k -> 29k/s, puts 26-30k -> 37k/s). Each
# further slice is twice the last, so a long batch still goes out in few sends (on loopback a
# send also runs the host's receive: 8 per send cost a pipelining client's target ~5% more).
COMPLETIONS_PER_SEND = 8
# H2CData a host sends at a time: commands queued meanwhile go out before the rest (no capsule
# waits behind megabytes of other commands' data), in sends as large as the socket's buffer.
BULK_PER_SEND = 1024 * 1024
_CID = struct.Struct("<H")
_IN_CAPSULE = int(SglIdentifier.DATA_BLOCK_OFFSET)
_TRANSPORT = int(SglIdentifier.TRANSPORT_DATA_BLOCK)


class _Sender:
    """Serialises sends on one socket: the task sending drains everything queued meanwhile.

    A task that finds another one sending returns at once: its PDUs are already queued in the
    connection, in order, and the sending task takes them before it stops. (No lock: between the
    last empty take and clearing the flag there is no await, so nothing can be left behind.)
    Before its first send the sending task yields once, so the PDUs that other ready tasks queue
    in the same turn of the loop (32 completions, 32 commands) go out in one ``sendmsg``: on
    loopback each ``sendmsg`` also runs the receiver's TCP stack, so fewer of them is the win.

    ``hand_over``: asked, when more was queued during a send, to have another task send it; True
    if one will (it calls ``flush``). Without it the sending task drains until nothing is left,
    which under steady load may be never: a host's caller would wait on other callers' data
    long after its own command completed.
    """

    def __init__(
        self,
        sock: ByteStream,
        conn: PduConnection,
        hand_over: Callable[[], bool] | None = None,
        chunk: int | None = None,
    ) -> None:
        self._sock = sock
        self._conn = conn
        self._hand_over = hand_over
        self._chunk = chunk  # bulk data per send (``PduConnection.data_to_send``); None: all
        self._sending = False

    async def flush(self) -> None:
        if self._sending or not self._conn.has_data_to_send:
            return
        self._sending = True
        try:
            await anyio.lowlevel.checkpoint()
            while buffers := self._conn.data_to_send(self._chunk):
                await self._sock.send_all(buffers)
                hand_over = self._hand_over
                if hand_over is not None and self._conn.has_data_to_send and hand_over():
                    return
        finally:
            self._sending = False


class TcpHostChannel:
    trtype = "tcp"

    def __init__(self, sock: ByteStream, conn: HostConnection) -> None:
        self._sock = sock
        self._conn = conn
        self._sender = _Sender(sock, conn, self._hand_over, BULK_PER_SEND)
        self._digest_failed: set[int] = set()
        self._lost: ConnectionLost | None = None
        self.peer = sock.peer
        self.max_in_capsule_data = ADMIN_IN_CAPSULE_DATA
        # Set by the queue: asked to have another task push what R2Ts queued (H2CData can be
        # megabytes; a reader pushing them itself reads no completion meanwhile, and the
        # pipeline drains). True if it found one (that task calls ``flush``); else the reader
        # sends them itself.
        self.delegate_send: Callable[[], bool] | None = None
        self._send_delegated = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        header_digest: bool = False,
        data_digest: bool = False,
        connector: HostConnector = open_tcp,
    ) -> TcpHostChannel:
        sock = await connector(host, port)
        conn = HostConnection(
            header_digest=header_digest, data_digest=data_digest, receive_buffer_size=RECEIVE_BUFFER
        )
        channel = cls(sock, conn)
        try:
            channel._conn.initiate()
            await channel._sender.flush()
            while True:
                event = await channel._next_event()
                if isinstance(event, ICRespReceived):
                    break
        except BaseException:
            await sock.aclose()
            raise
        return channel

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
        sqe = bytearray(64)
        command.pack_into(sqe, dptr=False)  # the SGL is this transport's, packed below
        _CID.pack_into(sqe, 2, cid)
        if out:
            total = sum(len(b) for b in out)
            if total <= self.max_in_capsule_data:
                pack_unkeyed_into(sqe, 24, 0, total, _IN_CAPSULE)
                self._conn.send_command(sqe, in_capsule=out)
            else:
                pack_unkeyed_into(sqe, 24, 0, total, _TRANSPORT)
                self._conn.send_command(sqe, write=out)
        else:
            pack_unkeyed_into(sqe, 24, 0, sum(map(len, into)), _TRANSPORT)
            self._conn.send_command(sqe, read_into=into)
        await self._flush()

    async def flush(self) -> None:
        """Push whatever is queued (the task ``delegate_send`` woke does this)."""
        self._send_delegated = False
        await self._flush()

    def undelegate(self) -> None:
        """The task asked to push the queued data will not: the reader sees to it."""
        self._send_delegated = False

    async def _flush(self) -> None:
        try:
            await self._sender.flush()
        except ConnectionLost as exc:
            self._lost = exc
            raise

    async def _push_queued(self) -> None:
        """Data queued by R2Ts: another task pushes it if the queue finds one, else we do."""
        if not self._conn.has_data_to_send or self._hand_over():
            return
        await self._flush()

    def _hand_over(self) -> bool:
        """Have a waiting task (not the reader, not one still submitting) push what is queued:
        True if one will, or already is asked to."""
        if self._send_delegated:
            return True
        delegate = self.delegate_send
        if delegate is not None and delegate():
            self._send_delegated = True
            return True
        return False

    def next_completion_nowait(self) -> Completion | None:
        """A completion already received and parsed, if the next event is one (no await: a
        reader working through a batch then costs no coroutine per completion)."""
        event = self._conn.next_response()
        return None if event is None else self._completion(event)

    async def next_completion(self) -> Completion:
        while True:
            event = await self._next_event()
            if isinstance(event, ResponseReceived):
                return self._completion(event)
            if isinstance(event, DataDigestError):
                log.warning("[%s] data digest error on cid %d", self.peer, event.cccid)
                self._digest_failed.add(event.cccid)

    def _completion(self, event: ResponseReceived) -> Completion:
        completion = Completion.unpack_from(event.cqe)
        if self._digest_failed and completion.cid in self._digest_failed:
            self._digest_failed.discard(completion.cid)
            if completion.status.success:
                completion = Completion(
                    cid=completion.cid,
                    status=Status.generic(GenericStatus.DATA_TRANSFER_ERROR, dnr=False),
                    sqid=completion.sqid,
                    sqhd=completion.sqhd,
                )
        return completion

    async def _next_event(self) -> object:
        if self._lost is not None:
            raise self._lost
        while True:
            event = self._conn.next_event()
            if event is not None:
                if isinstance(event, TermReqReceived):
                    await self._fail(f"peer terminated (fes=0x{event.fes:02x}, fei={event.fei})")
                if isinstance(event, ConnectionClosed):
                    await self._fail("peer closed the connection")
                return event
            # R2Ts are answered inside the connection; push the H2CData they queued.
            await self._push_queued()
            try:
                view = self._conn.wants()
                n = await self._sock.recv_into(view, at_least=self._conn.bytes_due)
                self._conn.received(n)
            except PduError as exc:
                log.error("[%s] protocol error from controller: %s", self.peer, exc)
                await self._send_quietly()
                await self._fail(f"protocol error: {exc}")
            except ConnectionLost as exc:
                await self._fail(str(exc))

    async def _send_quietly(self) -> None:
        with anyio.move_on_after(1):
            with contextlib.suppress(ConnectionLost):
                await self._sender.flush()

    async def _fail(self, reason: str) -> None:
        self._lost = ConnectionLost(f"queue to {self.peer}: {reason}")
        await self._sock.aclose()
        raise self._lost

    def forget(self, cid: int) -> None:
        self._conn.forget(cid)

    @property
    def success_completions(self) -> int:
        """Completions the controller folded into a C2HData with the SUCCESS flag."""
        return self._conn.success_completions

    async def aclose(self) -> None:
        if self._lost is None:
            self._lost = ConnectionLost(f"queue to {self.peer} closed")
        await self._sock.aclose()


class _Pull:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


class TcpControllerChannel:
    trtype = "tcp"

    def __init__(
        self,
        sock: ByteStream,
        *,
        maxh2cdata: int = 1 << 20,
        allow_digests: bool = True,
        negotiated: ConnectionParams | None = None,
        header_timeout: float = math.inf,
        in_capsule_budget: int = 256 << 20,
    ) -> None:
        """``negotiated``: the ICReq/ICResp exchange was done by whoever handed ``sock`` over
        (``nvmeof.target.workers``); the connection starts READY with these parameters.
        ``header_timeout``: seconds a peer may stall before its ICReq or inside a PDU.
        ``in_capsule_budget``: in-capsule bytes of commands not yet completed beyond which the
        connection reads no further until some complete (the host cannot be refused data it
        sends unasked; TCP's window holds it back instead)."""
        self._sock = sock
        self._header_timeout = header_timeout
        if negotiated is not None:
            self._conn = ControllerConnection.resumed(
                negotiated,
                max_in_capsule_data=ADMIN_IN_CAPSULE_DATA,
                max_c2h_data=maxh2cdata,
                receive_buffer_size=RECEIVE_BUFFER,
            )
        else:
            self._conn = ControllerConnection(
                maxh2cdata=maxh2cdata,
                max_in_capsule_data=ADMIN_IN_CAPSULE_DATA,
                max_c2h_data=maxh2cdata,
                allow_digests=allow_digests,
                receive_buffer_size=RECEIVE_BUFFER,
            )
        self._sender = _Sender(sock, self._conn)
        self._pulls: dict[int, _Pull] = {}
        self._in_capsule_budget = max(in_capsule_budget, 1)
        self._held: dict[Request, int] = {}  # in-capsule bytes by command, until it completes
        self._held_bytes = 0
        self._room: anyio.Event | None = None  # set when the held bytes fit the budget again
        self.sq_flow_control_disabled = False  # set by the queue's Connect (CATTR bit 2)
        self.success_shortcuts = 0
        self._closed = False
        self.peer = sock.peer
        self.on_digest_error: Callable[[int], None] | None = None

    def set_max_in_capsule_data(self, size: int) -> None:
        self._conn.set_max_in_capsule_data(size)

    def set_in_capsule_allocator(self, allocate: InCapsuleAllocator | None) -> None:
        """Where in-capsule data still to arrive lands (the namespace's own buffers)."""
        self._conn.allocate_in_capsule = allocate

    @property
    def header_digest(self) -> bool:
        return bool(self._conn.params and self._conn.params.header_digest)

    @property
    def data_digest(self) -> bool:
        return bool(self._conn.params and self._conn.params.data_digest)

    async def run(self, on_request: Callable[[Request], None]) -> None:
        commands = 0  # since the last send
        batch = COMPLETIONS_PER_SEND  # the next send's
        try:
            while True:
                event = self._conn.next_event()
                if event is None:
                    commands = 0
                    batch = COMPLETIONS_PER_SEND
                    if self._conn.has_data_to_send:
                        await self._sender.flush()
                    while self._held_bytes > self._in_capsule_budget and not self._closed:
                        self._room = anyio.Event()
                        await self._room.wait()
                    # An idle queue is keep-alive's business: no timer between PDUs.
                    stall = math.inf if self._conn.between_pdus else self._header_timeout
                    try:
                        view = self._conn.wants()
                        n = await self._sock.recv_into(
                            view, timeout=stall, at_least=self._conn.bytes_due
                        )
                    except TimeoutError:
                        log.warning(
                            "[%s] peer stalled %ss inside a PDU (or before ICReq): closing",
                            self.peer, self._header_timeout,
                        )  # fmt: skip
                        return
                    self._conn.received(n)
                    continue
                if isinstance(event, DataReceived):
                    pull = self._pulls.pop(event.cccid, None)
                    if pull is not None:
                        pull.done.set()
                elif isinstance(event, DataDigestError):
                    log.warning("[%s] data digest error on cid %d", self.peer, event.cccid)
                    pull = self._pulls.pop(event.cccid, None)
                    if pull is not None:
                        pull.error = _digest_mismatch()
                        pull.done.set()
                    elif self.on_digest_error is not None:
                        self.on_digest_error(event.cccid)
                elif isinstance(event, ICReqReceived):
                    await self._sender.flush()
                elif isinstance(event, (TermReqReceived, ConnectionClosed)):
                    return
                elif isinstance(event, CommandReceived):
                    request = Request(Command.unpack_from(event.sqe), event.data)
                    if event.data is not None:
                        self._held[request] = len(event.data)
                        self._held_bytes += len(event.data)
                    on_request(request)
                    commands += 1
                    if commands >= batch and self._conn.has_data_to_send:
                        commands = 0
                        batch *= 2
                        await self._sender.flush()
        except PduError as exc:
            log.warning("[%s] terminating connection: %s", self.peer, exc)
            with anyio.move_on_after(1):
                with contextlib.suppress(ConnectionLost):
                    await self._sender.flush()
        except ConnectionLost as exc:
            log.info("[%s] %s", self.peer, exc)
        finally:
            self._fail_pulls()
            await self.aclose()

    def _fail_pulls(self) -> None:
        for pull in self._pulls.values():
            pull.error = ConnectionLost(f"connection to {self.peer} closed during data transfer")
            pull.done.set()
        self._pulls.clear()

    async def pull(self, request: Request, into: memoryview) -> None:
        cid = request.command.cid
        if request.in_capsule is not None:
            if len(request.in_capsule) < len(into):
                raise _short_data()
            into[:] = request.in_capsule[: len(into)]
            return
        if request.command.dptr.length < len(into):
            raise _short_data()
        if self._closed:
            raise ConnectionLost(f"connection to {self.peer} closed")
        pull = _Pull()
        self._pulls[cid] = pull
        self._conn.request_data(cid, into)
        await self._sender.flush()
        await pull.done.wait()
        if pull.error is not None:
            raise pull.error

    def complete_nowait(
        self, request: Request, completion: Completion, data: Sequence[Buffer] = ()
    ) -> None:
        """Queue the data and the completion; the receive loop sends them before it waits."""
        if self._held:
            self._release(request)
        if self._closed:
            return
        if (
            data
            and self.sq_flow_control_disabled
            and completion.status.success
            and completion.dw0 == completion.dw1 == 0
        ):
            # The SUCCESS flag on the last C2HData stands in for the CapsuleResp: one PDU less.
            # As SPDK and Linux nvmet: only when the host disabled SQ flow control at Connect
            # (it then needs no SQHD) and there is no DW0/DW1 to carry (never a KV Retrieve).
            self._conn.send_data(request.command.cid, data, success=True)
            self.success_shortcuts += 1
            return
        if data:
            self._conn.send_data(request.command.cid, data)
        cqe = bytearray(16)
        completion.pack_into(cqe)
        self._conn.send_response(cqe)

    def _release(self, request: Request) -> None:
        self._held_bytes -= self._held.pop(request, 0)
        if self._room is not None and self._held_bytes <= self._in_capsule_budget:
            self._room.set()
            self._room = None

    async def complete(
        self, request: Request, completion: Completion, data: Sequence[Buffer] = ()
    ) -> None:
        self.complete_nowait(request, completion, data)  # (closed: only frees its budget)
        if self._closed:
            return
        try:
            await self._sender.flush()
        except ConnectionLost:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._room is not None:
                self._room.set()  # a receive loop holding back for room: it ends instead
            await self._sock.aclose()


def _digest_mismatch() -> CommandError:
    # SPDK fails the command with a transient transport error and keeps the connection.
    return CommandError(
        Status.generic(GenericStatus.TRANSIENT_TRANSPORT_ERROR, dnr=False), "data digest mismatch"
    )


def _short_data() -> CommandError:
    return CommandError(
        Status.generic(GenericStatus.DATA_SGL_LENGTH_INVALID), "data shorter than the command needs"
    )
