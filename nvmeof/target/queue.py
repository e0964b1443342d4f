"""One queue pair on the target: Connect, then dispatch of each command to its handler.

This is the command seam (httpx's MockTransport, nvme-loop): ``QueueSession.execute(request)``
takes a request and gives a completion, whatever transport the request came over.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import anyio.abc
import anyio.lowlevel

from nvmeof.errors import CommandError, ConnectionLost
from nvmeof.spec.auth import MAX_AUTH_TRANSFER, AuthCommandFields
from nvmeof.spec.command import AdminOpcode, Command, DataDirection
from nvmeof.spec.completion import SQHD_FLOW_CONTROL_DISABLED, Completion
from nvmeof.spec.fabrics import (
    CONNECT_AUTHREQ_ATR,
    CONNECT_DATA_SIZE,
    DISCOVERY_NQN,
    DYNAMIC_CNTLID,
    ConnectData,
    ConnectDataError,
    ConnectParameters,
    FabricsCommandType,
    PropertyAccess,
)
from nvmeof.spec.status import SUCCESS, FabricsStatus, GenericStatus, Status
from nvmeof.target.auth import AllocationTooSmall, ControllerAuthentication
from nvmeof.target.controller import Controller, invalid_field
from nvmeof.target.discovery import controller_factory
from nvmeof.target.namespace import CommandResult
from nvmeof.target.subsystem import ListenAddress, Target
from nvmeof.tcp.connection import InCapsuleAllocator
from nvmeof.transport.base import Buffer, ControllerChannel, Request

log = logging.getLogger("nvmeof.target.queue")

AUTH_FAILURE_CLOSE_DELAY = 1.0  # seconds between a Failure1 and closing the queue
# While the admin queue authenticates, the host cannot send Keep Alive (Authentication Required)
# and computes between messages (a Linux host under QEMU TCG spends > 5 s on ffdhe8192): each
# authentication message holds the keep-alive timer for this long beyond KATO.
AUTH_KEEP_ALIVE_GRACE = 30.0


def _connect_invalid(offset: int, *, in_data: bool) -> CommandError:
    # DW0: IPO (offset of the bad field), bit 16 IATTR (1: in the connect data, 0: in the SQE).
    return CommandError(
        Status.command_specific(FabricsStatus.CONNECT_INVALID_PARAMETERS),
        f"invalid connect parameter at {'data' if in_data else 'SQE'} offset {offset}",
        dw0=offset | (1 << 16 if in_data else 0),
    )


def _sequence_error(message: str) -> CommandError:
    return CommandError(Status.generic(GenericStatus.COMMAND_SEQUENCE_ERROR), message)


def _invalid_opcode(message: str) -> CommandError:
    return CommandError(Status.generic(GenericStatus.INVALID_OPCODE), message)


def _trim(data: Sequence[Buffer], limit: int) -> list[Buffer]:
    """Controller-to-host data never exceeds what the host's SGL describes."""
    out: list[Buffer] = []
    for buf in data:
        if limit <= 0:
            break
        if len(buf) > limit:
            buf = memoryview(buf)[:limit]
        out.append(buf)
        limit -= len(buf)
    return out


class _ByteBudget:
    """Bytes in flight on one connection; a command waits until its data fits."""

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 1)
        self.used = 0
        self._freed = anyio.Event()

    async def acquire(self, size: int) -> int:
        size = min(size, self.limit)  # one command larger than the budget runs alone
        while self.used + size > self.limit:
            await self._freed.wait()
        self.used += size
        return size

    def release(self, size: int) -> None:
        if size:
            self.used -= size
            self._freed.set()
            self._freed = anyio.Event()


class QueueSession:
    """The target side of one queue: which controller and QID it belongs to, once connected."""

    def __init__(
        self,
        target: Target,
        channel: ControllerChannel,
        task_group: anyio.abc.TaskGroup,
        *,
        listen_address: ListenAddress | None = None,
    ) -> None:
        self.target = target
        self.channel = channel
        self.task_group = task_group
        self.listen_address = listen_address  # the listener this connection came in through
        self.controller: Controller | None = None
        self.qid = 0
        self.sqsize = 0
        self.sq_flow_control_disabled = False
        self._sqhd = 0
        self._slots: anyio.Semaphore | None = None
        self._active: set[int] = set()
        # DH-HMAC-CHAP on this queue (the host must authenticate before anything else).
        self.auth: ControllerAuthentication | None = None
        self._close_after_reply = False
        self._in_flight = _ByteBudget(target.limits.max_in_flight_bytes)
        self.log: logging.LoggerAdapter[logging.Logger] = logging.LoggerAdapter(log, {})

    # --- transport callbacks -----------------------------------------------------------------
    def on_request(self, request: Request) -> None:
        cid = request.command.cid
        if cid in self._active:
            # Refuse before touching any state of the command already running with this CID.
            status = Status.generic(GenericStatus.CID_CONFLICT)
            self.log.warning("%s cid %d reused while in flight", self._tag(), cid)
            completion = self._completion(cid, status, 0, 0)
            self.task_group.start_soon(self.channel.complete, request, completion)
            return
        if self._serve_now(request):
            return
        self._active.add(cid)
        self.task_group.start_soon(self.serve, request)

    def _serve_now(self, request: Request) -> bool:
        """Serve an I/O command that needs no waiting right here in the receive loop.

        A DRAM Retrieve or an in-capsule Store then costs no task, no slot and no scheduling;
        its completion is queued and goes out with the others in the loop's next send.
        """
        complete_now = getattr(self.channel, "complete_nowait", None)
        controller = self.controller
        cmd = request.command
        if (
            complete_now is None
            or controller is None
            or self.qid == 0
            or not controller.ready
            or cmd.opcode == AdminOpcode.FABRICS
        ):
            return False
        execute_now = getattr(controller.subsystem.namespaces.get(cmd.nsid), "execute_now", None)
        if execute_now is None:
            return False
        data: Sequence[Buffer] = ()
        try:
            self._check_authenticated()
            result = execute_now(request)
            if result is None:
                return False
            completion = self._completion(cmd.cid, SUCCESS, result.dw0, result.dw1)
            data = _trim(result.data, cmd.dptr.length)
        except CommandError as exc:
            completion = self._completion(cmd.cid, exc.status, exc.dw0, 0)
        except Exception:
            self.log.exception("%s cid %d opcode 0x%02x crashed", self._tag(), cmd.cid, cmd.opcode)
            completion = self._completion(
                cmd.cid, Status.generic(GenericStatus.INTERNAL_ERROR), 0, 0
            )
        self._trace(cmd, completion, data)
        complete_now(request, completion, data)
        return True

    def _trace(self, cmd: Command, completion: Completion, data: Sequence[Buffer]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s cid %d opcode 0x%02x nsid %d -> %s dw0 0x%x, %d data bytes",
                self._tag(), cmd.cid, cmd.opcode, cmd.nsid, completion.status,
                completion.dw0, sum(len(b) for b in data),
            )  # fmt: skip

    def on_digest_error(self, cid: int) -> None:
        # In-capsule data failed its digest: fail that command, keep the connection (as SPDK).
        status = Status.generic(GenericStatus.TRANSIENT_TRANSPORT_ERROR, dnr=False)
        request = Request(Command(opcode=0, cid=cid))
        completion = self._completion(cid, status, 0, 0)
        self.task_group.start_soon(self.channel.complete, request, completion)

    async def serve(self, request: Request) -> None:
        try:
            if self._slots is None:
                await self._serve_one(request)
                return
            try:
                self._slots.acquire_nowait()  # the host keeps within SQSIZE: no yield needed
            except anyio.WouldBlock:
                await self._slots.acquire()
            pending = 0
            try:
                # Data the host will send (R2T) is buffered here: bound it per connection.
                cmd = request.command
                if request.in_capsule is None and (
                    cmd.data_direction == DataDirection.HOST_TO_CONTROLLER
                ):
                    pending = await self._in_flight.acquire(cmd.dptr.length)
                await self._serve_one(request)
            finally:
                self._in_flight.release(pending)
                self._slots.release()
        finally:
            self._active.discard(request.command.cid)

    async def _serve_one(self, request: Request) -> None:
        cmd = request.command
        data: Sequence[Buffer] = ()
        try:
            result = await self.execute(request)
            if result is None:
                return
            completion = self._completion(cmd.cid, SUCCESS, result.dw0, result.dw1)
            data = _trim(result.data, cmd.dptr.length)
        except CommandError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s cid %d opcode 0x%02x: %s", self._tag(), cmd.cid, cmd.opcode, exc)
            completion = self._completion(cmd.cid, exc.status, exc.dw0, 0)
        except ConnectionLost:
            return
        except Exception:
            self.log.exception("%s cid %d opcode 0x%02x crashed", self._tag(), cmd.cid, cmd.opcode)
            completion = self._completion(
                cmd.cid, Status.generic(GenericStatus.INTERNAL_ERROR), 0, 0
            )
        self._trace(cmd, completion, data)
        # The host may reuse the CID as soon as it sees this completion: free it first.
        self._active.discard(cmd.cid)
        await self.channel.complete(request, completion, data)
        if self._close_after_reply:
            self._close_after_reply = False
            self.task_group.start_soon(self._close_after_grace)

    def _completion(self, cid: int, status: Status, dw0: int, dw1: int) -> Completion:
        if self.sq_flow_control_disabled:
            sqhd = SQHD_FLOW_CONTROL_DISABLED
        else:
            self._sqhd = (self._sqhd + 1) % (self.sqsize + 1 or 1)
            sqhd = self._sqhd
        return Completion(cid, status, dw0, dw1, sqhd, self.qid)  # positional: every command

    def _tag(self) -> str:
        cntlid = self.controller.cntlid if self.controller else "-"
        return f"[{cntlid}/{self.qid}]"

    # --- the command seam -------------------------------------------------------------------
    async def execute(self, request: Request) -> CommandResult | None:
        cmd = request.command
        if cmd.opcode == AdminOpcode.FABRICS:
            return await self._execute_fabrics(request)
        controller = self.controller
        if controller is None:
            raise _sequence_error("command before Connect")
        self._check_authenticated()
        if self.qid == 0:
            return controller.execute_admin(request, anyio.current_time())
        if not controller.ready:
            raise _sequence_error("I/O command to a controller that is not ready")
        ns = controller.subsystem.namespaces.get(cmd.nsid)
        if ns is None:
            raise CommandError(
                Status.generic(GenericStatus.INVALID_NAMESPACE_OR_FORMAT),
                f"namespace {cmd.nsid} is not attached",
            )
        return await ns.execute(request, self.channel)

    async def _execute_fabrics(self, request: Request) -> CommandResult:
        fctype = request.command.fctype
        if fctype == FabricsCommandType.CONNECT:
            return await self._connect(request)
        controller = self.controller
        if controller is None:
            raise _sequence_error("fabrics command before Connect")
        if fctype in (
            FabricsCommandType.AUTHENTICATION_SEND,
            FabricsCommandType.AUTHENTICATION_RECEIVE,
        ):
            return await self._authenticate(request)
        self._check_authenticated()
        if fctype == FabricsCommandType.PROPERTY_GET and self.qid == 0:
            access = _property_access(request)
            value = controller.get_property(access.offset, access.size)
            return CommandResult(dw0=value & 0xFFFFFFFF, dw1=value >> 32)
        if fctype == FabricsCommandType.PROPERTY_SET and self.qid == 0:
            access = _property_access(request)
            controller.set_property(access.offset, access.size, access.value)
            return CommandResult()
        if fctype == FabricsCommandType.DISCONNECT:
            if self.qid == 0:
                raise CommandError(
                    Status.command_specific(FabricsStatus.DISCONNECT_INVALID_QUEUE_TYPE)
                )
            self.task_group.start_soon(self._close_after_completion)
            return CommandResult()
        raise _invalid_opcode(f"fabrics command type 0x{fctype:02x}")

    def _check_authenticated(self) -> None:
        if self.auth is not None and not self.auth.authenticated:
            raise CommandError(
                Status.command_specific(FabricsStatus.AUTHENTICATION_REQUIRED),
                "authentication required",
            )

    async def _authenticate(self, request: Request) -> CommandResult:
        """Authentication Send / Receive (DH-HMAC-CHAP), as Linux nvmet."""
        auth = self.auth
        fields = AuthCommandFields.from_command(request.command)
        if auth is None:
            raise invalid_field("authentication is not required on this queue")
        if not fields.valid_protocol:
            raise invalid_field(
                f"SECP 0x{fields.secp:02x} SPSP 0x{fields.spsp0:02x}/0x{fields.spsp1:02x}"
            )
        if not 0 < fields.length <= MAX_AUTH_TRANSFER:
            raise invalid_field(f"authentication transfer length {fields.length}")
        if request.command.fctype == FabricsCommandType.AUTHENTICATION_SEND:
            raw = bytearray(fields.length)
            await self.channel.pull(request, memoryview(raw))
            auth.on_send(bytes(raw))
            data: list[Buffer] = []
        else:
            try:
                data = [auth.on_receive(fields.length)]
            except AllocationTooSmall as exc:
                raise invalid_field(str(exc)) from exc
        if self.qid == 0 and self.controller is not None:
            now = anyio.current_time()
            self.controller.keep_alive(now if auth.authenticated else now + AUTH_KEEP_ALIVE_GRACE)
        if auth.failed:
            self.log.warning(
                "%s authentication of %s from %s failed: closing the queue",
                self._tag(), auth.hostnqn, self.channel.peer,
            )  # fmt: skip
            self._close_after_reply = True
        elif auth.authenticated and self.controller is not None:
            self.log.info("%s host %s authenticated", self._tag(), auth.hostnqn)
        return CommandResult(data=data)

    async def _close_after_grace(self) -> None:
        # Failure1 is on its way: give the host a moment to read it and hang up itself (Linux
        # does); the queue answers nothing but Authentication Required meanwhile.
        await anyio.sleep(AUTH_FAILURE_CLOSE_DELAY)
        await self.channel.aclose()

    async def _close_after_completion(self) -> None:
        await anyio.lowlevel.checkpoint()
        await self.channel.aclose()

    async def _connect(self, request: Request) -> CommandResult:
        if self.controller is not None:
            raise _sequence_error("second Connect on a connected queue")
        params = ConnectParameters.from_command(request.command)
        if params.recfmt != 0:
            raise CommandError(
                Status.command_specific(FabricsStatus.INCOMPATIBLE_FORMAT),
                f"connect record format {params.recfmt}",
            )
        raw = bytearray(CONNECT_DATA_SIZE)
        await self.channel.pull(request, memoryview(raw))
        try:
            data = ConnectData.unpack(raw)
        except ConnectDataError as exc:
            raise _connect_invalid(exc.offset, in_data=True) from exc
        limits = self.target.limits
        if params.sqsize == 0:
            raise _connect_invalid(44, in_data=False)
        subsystem = self.target.subsystems.get(data.subnqn)
        if data.subnqn == DISCOVERY_NQN:
            subsystem = self.target.discovery_subsystem  # a discovery controller (CNTRLTYPE 2)
        if subsystem is None:
            raise _connect_invalid(256, in_data=True)
        if not subsystem.host_allowed(data.hostnqn):
            self.log.warning(
                "connect from %s (%s) to %s refused: host not allowed",
                data.hostnqn, self.channel.peer, data.subnqn,
            )  # fmt: skip
            raise CommandError(
                Status.command_specific(FabricsStatus.CONNECT_INVALID_HOST),
                f"host {data.hostnqn} may not connect to {data.subnqn}",
            )
        if not subsystem.listener_allowed(self.listen_address):
            # As SPDK: "does not allow host ... to connect at this address" (Invalid Host).
            self.log.warning(
                "connect from %s to %s through unlisted address %s refused",
                data.hostnqn, data.subnqn, self.listen_address,
            )  # fmt: skip
            raise CommandError(
                Status.command_specific(FabricsStatus.CONNECT_INVALID_HOST),
                f"{data.subnqn} does not listen on {self.listen_address}",
            )
        now = anyio.current_time()
        if params.qid == 0:
            if data.cntlid != DYNAMIC_CNTLID:
                raise _connect_invalid(16, in_data=True)
            if params.sqsize > 0xFFF:
                raise _connect_invalid(44, in_data=False)
            controller = controller_factory(self.target, subsystem)(
                cntlid=self.target.allocate_cntlid(subsystem),
                subsystem=subsystem,
                limits=limits,
                hostnqn=data.hostnqn,
                hostid=data.hostid,
                kato_ms=params.kato_ms,
                now=now,
            )
            subsystem.controllers[controller.cntlid] = controller
            controller.listen_address = self.listen_address
            controller.keyed_sgls = self.channel.trtype == "rdma"
            controller.async_event_sink = self._complete_async_event
            controller.closers.append(self._close_soon)
            self.task_group.start_soon(self._watch_keep_alive, controller)
            self.log.info(
                "[%d/0] admin queue connected: host %s subsystem %s kato %d ms",
                controller.cntlid,
                data.hostnqn,
                subsystem.nqn,
                params.kato_ms,
            )
        else:
            found = subsystem.controllers.get(data.cntlid)
            if found is None or found.hostnqn != data.hostnqn or found.hostid != data.hostid:
                raise _connect_invalid(16, in_data=True)
            controller = found
            if not controller.csts.rdy:
                raise _sequence_error("I/O queue connect before the controller is enabled")
            if params.qid > controller.granted_io_queues:
                raise _connect_invalid(42, in_data=False)
            if params.qid in controller.io_queues:
                raise CommandError(
                    Status.command_specific(FabricsStatus.CONTROLLER_BUSY),
                    f"queue {params.qid} already connected",
                )
            if params.sqsize + 1 > limits.max_queue_entries:
                raise _connect_invalid(44, in_data=False)
            controller.io_queues.add(params.qid)
            controller.closers.append(self._close_soon)
            self.channel.set_max_in_capsule_data(
                limits.in_capsule_data_size_for(self.channel.trtype)
            )
            set_allocator = getattr(self.channel, "set_in_capsule_allocator", None)
            if set_allocator is not None:
                set_allocator(_in_capsule_allocator(controller))
            self.log.debug("[%d/%d] I/O queue connected", controller.cntlid, params.qid)
        self.controller = controller
        self.qid = params.qid
        self.sqsize = params.sqsize
        self.sq_flow_control_disabled = params.sq_flow_control_disabled
        if hasattr(self.channel, "sq_flow_control_disabled"):  # TCP: SUCCESS-flag completions
            self.channel.sq_flow_control_disabled = params.sq_flow_control_disabled
        self._slots = anyio.Semaphore(params.sqsize + 1)
        auth_config = subsystem.auth_config(data.hostnqn)
        if auth_config is None:
            return CommandResult(dw0=controller.cntlid)
        # Every queue authenticates (admin and I/O), so knowing a CNTLID is not enough to attach.
        self.auth = ControllerAuthentication(
            auth_config, hostnqn=data.hostnqn, subnqn=subsystem.nqn
        )
        return CommandResult(dw0=controller.cntlid | CONNECT_AUTHREQ_ATR)

    def _complete_async_event(self, request: Request, dw0: int) -> None:
        """Complete a held Async Event Request (the controller chose it and its DW0)."""
        completion = self._completion(request.command.cid, Status(), dw0, 0)
        self.task_group.start_soon(self.channel.complete, request, completion)

    def _close_soon(self) -> None:
        self.task_group.start_soon(self.channel.aclose)

    async def _watch_keep_alive(self, controller: Controller) -> None:
        while controller.cntlid in controller.subsystem.controllers:
            now = anyio.current_time()
            if controller.on_timer(now):
                controller.log.warning(
                    "[%d] keep alive timeout (%d ms): tearing the controller down",
                    controller.cntlid,
                    controller.kato_ms,
                )
                self.teardown()
                return
            deadline = controller.next_deadline()
            await anyio.sleep(1.0 if deadline is None else min(max(deadline - now, 0.01), 1.0))

    def teardown(self) -> None:
        """The connection is gone: an admin queue takes its controller with it."""
        controller = self.controller
        if controller is None:
            return
        if self.qid == 0:
            if controller.subsystem.controllers.get(controller.cntlid) is controller:
                del controller.subsystem.controllers[controller.cntlid]
                controller.log.info("[%d] controller removed", controller.cntlid)
            controller.close()
        else:
            controller.io_queues.discard(self.qid)
            if self._close_soon in controller.closers:
                controller.closers.remove(self._close_soon)


def _in_capsule_allocator(controller: Controller) -> InCapsuleAllocator:
    """In-capsule data lands where the command's namespace wants it (a KV Store: its value)."""
    namespaces = controller.subsystem.namespaces

    def allocate(sqe: memoryview, size: int) -> bytearray | memoryview:
        nsid = int.from_bytes(sqe[4:8], "little")
        allocate_for = getattr(namespaces.get(nsid), "allocate_in_capsule", None)
        return bytearray(size) if allocate_for is None else allocate_for(sqe, size)

    return allocate


def _property_access(request: Request) -> PropertyAccess:
    try:
        return PropertyAccess.from_command(request.command)
    except ValueError as exc:
        raise invalid_field(str(exc)) from exc
