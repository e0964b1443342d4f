"""A fabrics I/O controller: properties, admin commands, features, keep alive.

Time is a parameter (aioquic): ``next_deadline()`` and ``on_timer(now)`` carry the keep-alive
timer, so the same logic runs under a real clock and the simulator's virtual one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nvmeof.errors import CommandError
from nvmeof.spec.command import AdminOpcode
from nvmeof.spec.features import (
    FeatureId,
    FeatureParameters,
    LogPageId,
    LogPageParameters,
    decode_number_of_queues,
    encode_number_of_queues,
    pack_commands_supported_and_effects,
)
from nvmeof.spec.identify import (
    Cns,
    CommandSetIdentifier,
    ControllerType,
    CsiIndependentNamespace,
    IdentifyController,
    IdentifyParameters,
    NamespaceIdDescriptor,
    NamespaceIdType,
    pack_io_command_set_vectors,
    pack_namespace_id_descriptors,
    pack_namespace_list,
)
from nvmeof.spec.properties import (
    VERSION_2_0,
    CommandSetSelection,
    ControllerCapabilities,
    ControllerConfiguration,
    ControllerStatus,
    PropertyOffset,
    ShutdownNotification,
    ShutdownStatus,
)
from nvmeof.spec.status import CommandSpecificStatus, GenericStatus, Status
from nvmeof.target.namespace import CommandResult

if TYPE_CHECKING:
    from nvmeof.target.namespace import Namespace
    from nvmeof.target.subsystem import ListenAddress, Subsystem, TargetLimits
    from nvmeof.transport.base import Request

log = logging.getLogger("nvmeof.target.controller")

FIRMWARE_REVISION = "0.1.0"
IDENTIFY_SIZE = 4096
NSID_BROADCAST = 0xFFFFFFFF

# Asynchronous events: Async Event Configuration bit 8 and OAES bit 8 (Namespace Attribute
# Notices); the event's DW0 (type 2 = notice, info 0x00 = namespace attribute changed, log page
# 0x04); the Changed Namespace List holds at most 1024 NSIDs, else FFFFFFFFh alone.
AEC_NAMESPACE_ATTRIBUTE_NOTICES = 1 << 8
OAES_NAMESPACE_ATTRIBUTE_NOTICES = 1 << 8
NAMESPACE_ATTRIBUTE_CHANGED_EVENT = 0x2 | 0x00 << 8 | LogPageId.CHANGED_NAMESPACES << 16
CHANGED_NAMESPACE_LIST_MAX = 1024

# CAP.CSS bits (relative to bit 37): NVM command set, and "one or more I/O command sets".
_CSS_NVM = 1 << 0
_CSS_IO_COMMAND_SETS = 1 << 6

_ADMIN_EFFECTS = {
    AdminOpcode.GET_LOG_PAGE: 0x1,
    AdminOpcode.IDENTIFY: 0x1,
    AdminOpcode.ABORT: 0x1,
    AdminOpcode.SET_FEATURES: 0x1,
    AdminOpcode.GET_FEATURES: 0x1,
    AdminOpcode.ASYNC_EVENT_REQUEST: 0x1,
    AdminOpcode.KEEP_ALIVE: 0x1,
}


def invalid_field(message: str) -> CommandError:
    return CommandError(Status.generic(GenericStatus.INVALID_FIELD), message)


def _mdts(max_transfer_size: int) -> int:
    units = max(1, max_transfer_size // 4096)
    return units.bit_length() - 1


class Controller:
    """One host's controller on one subsystem (dynamic controller model)."""

    def __init__(
        self,
        *,
        cntlid: int,
        subsystem: Subsystem,
        limits: TargetLimits,
        hostnqn: str,
        hostid: bytes,
        kato_ms: int,
        now: float,
    ) -> None:
        self.cntlid = cntlid
        self.subsystem = subsystem
        self.limits = limits
        self.hostnqn = hostnqn
        self.hostid = hostid
        self.kato_ms = kato_ms
        self.cc = ControllerConfiguration.from_int(0)
        self.csts = ControllerStatus.from_int(0)
        self.granted_io_queues = 0
        self.keyed_sgls = False  # a controller reached over RDMA (set on admin Connect)
        self.io_queues: set[int] = set()
        self.async_event_config = 0
        self.pending_async_events: list[Request] = []  # held AERs, oldest first
        # Called to complete a held AER with a DW0; set by the admin queue's session.
        self.async_event_sink: Callable[[Request, int], None] | None = None
        self._queued_events: list[int] = []  # events waiting for an AER
        self._changed_nsids: list[int] = []
        self._namespace_notice_masked = False  # until the host reads log page 0x04
        self.listen_address: ListenAddress | None = None  # where the host connected
        self._last_keep_alive = now
        self.closers: list[Callable[[], object]] = []
        self.log = logging.LoggerAdapter(log, {"cntlid": cntlid})

    # --- identity ---------------------------------------------------------------------------
    @property
    def capabilities(self) -> ControllerCapabilities:
        return ControllerCapabilities(
            mqes=self.limits.max_queue_entries - 1,
            cqr=True,
            to=15,
            css=_CSS_NVM | _CSS_IO_COMMAND_SETS,
        )

    @property
    def ready(self) -> bool:
        return bool(self.csts.rdy) and self.csts.shst == ShutdownStatus.NORMAL_OPERATION

    def __repr__(self) -> str:
        return f"<Controller {self.cntlid} {self.subsystem.nqn} host={self.hostnqn}>"

    # --- keep alive -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if self.kato_ms == 0:
            return None
        return self._last_keep_alive + self.kato_ms / 1000

    def on_timer(self, now: float) -> bool:
        """True when the keep-alive timer has expired (the caller tears the controller down)."""
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    def keep_alive(self, now: float) -> None:
        self._last_keep_alive = now

    # --- properties -------------------------------------------------------------------------
    def get_property(self, offset: int, size: int) -> int:
        if offset == PropertyOffset.CAP and size == 8:
            return self.capabilities.to_int()
        if size == 4:
            if offset == PropertyOffset.VS:
                return VERSION_2_0
            if offset == PropertyOffset.CC:
                return self.cc.to_int()
            if offset == PropertyOffset.CSTS:
                return self.csts.to_int()
        raise invalid_field(f"property get 0x{offset:x} size {size} not supported")

    def set_property(self, offset: int, size: int, value: int) -> None:
        if offset != PropertyOffset.CC or size != 4:
            raise invalid_field(f"property set 0x{offset:x} size {size} not supported")
        new = ControllerConfiguration.from_int(value & 0xFFFFFFFF)
        old = self.cc
        self.cc = new
        if new.en and not old.en:
            if (
                new.mps != 0
                or new.ams != 0
                or new.iosqes != 6
                or new.iocqes != 4
                or new.css not in (CommandSetSelection.NVM, CommandSetSelection.ALL_IO)
            ):
                self.log.warning("[%d] enable with unsupported CC 0x%08x", self.cntlid, value)
                self.csts = ControllerStatus(rdy=False, cfs=True)
            else:
                self.csts = ControllerStatus(rdy=True)
                self.log.info("[%d] enabled (host %s)", self.cntlid, self.hostnqn)
        elif not new.en and old.en:
            self.csts = ControllerStatus()
            self.log.info("[%d] disabled", self.cntlid)
        if new.shn != ShutdownNotification.NONE and old.shn == ShutdownNotification.NONE:
            # Nothing is cached in volatile state beyond what each engine already persists.
            self.csts = ControllerStatus(rdy=self.csts.rdy, shst=ShutdownStatus.COMPLETE)
            self.log.info("[%d] shutdown complete", self.cntlid)

    # --- admin commands ---------------------------------------------------------------------
    def execute_admin(self, request: Request, now: float) -> CommandResult | None:
        """Execute a non-fabrics admin command; None means "held" (Async Event Request)."""
        cmd = request.command
        if not self.csts.rdy:
            raise CommandError(
                Status.generic(GenericStatus.COMMAND_SEQUENCE_ERROR),
                "admin command to a disabled controller",
            )
        opcode = cmd.opcode
        if opcode == AdminOpcode.IDENTIFY:
            return CommandResult(data=[self.identify(IdentifyParameters.from_command(cmd))])
        if opcode == AdminOpcode.KEEP_ALIVE:
            self.keep_alive(now)
            return CommandResult()
        if opcode == AdminOpcode.SET_FEATURES:
            return CommandResult(dw0=self.set_feature(FeatureParameters.from_command(cmd), now))
        if opcode == AdminOpcode.GET_FEATURES:
            return CommandResult(dw0=self.get_feature(FeatureParameters.from_command(cmd)))
        if opcode == AdminOpcode.GET_LOG_PAGE:
            params = LogPageParameters.from_command(cmd)
            if params.length > self.limits.max_transfer_size:
                # NUMD reaches 16 GiB; the page is zero-padded to it (found by fuzzing: OOM).
                raise invalid_field(f"log page length {params.length} exceeds MDTS")
            return CommandResult(data=[self.log_page(params)])
        if opcode == AdminOpcode.ASYNC_EVENT_REQUEST:
            if len(self.pending_async_events) >= self.limits.max_async_events:
                raise CommandError(
                    Status.command_specific(
                        CommandSpecificStatus.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED
                    )
                )
            self.pending_async_events.append(request)
            self._deliver_async_events()
            return None
        if opcode == AdminOpcode.ABORT:
            # Commands run to completion quickly; like Linux nvmet, report "not aborted".
            return CommandResult(dw0=1)
        raise CommandError(
            Status.generic(GenericStatus.INVALID_OPCODE), f"admin opcode 0x{opcode:02x}"
        )

    def identify(self, params: IdentifyParameters) -> bytes:
        cns = params.cns
        if cns == Cns.CONTROLLER:
            return self.identify_controller().pack()
        if cns == Cns.ACTIVE_NAMESPACES:
            if params.nsid >= 0xFFFFFFFE:
                raise _invalid_namespace(params.nsid)
            return pack_namespace_list(
                n for n in sorted(self.subsystem.namespaces) if n > params.nsid
            )
        if cns == Cns.CSI_ACTIVE_NAMESPACES:
            if params.nsid >= 0xFFFFFFFE:
                raise _invalid_namespace(params.nsid)
            return pack_namespace_list(
                n
                for n, ns in sorted(self.subsystem.namespaces.items())
                if n > params.nsid and ns.csi == params.csi
            )
        if cns == Cns.IO_COMMAND_SET:
            # Vector 0: NVM and KV together (what CC.CSS=110b enables).
            return pack_io_command_set_vectors([0b11])
        if cns == Cns.CSI_CONTROLLER:
            return self._identify_csi_controller(params.csi)
        if cns in (
            Cns.NAMESPACE,
            Cns.NAMESPACE_ID_DESCRIPTORS,
            Cns.CSI_NAMESPACE,
            Cns.CSI_INDEPENDENT_NAMESPACE,
        ):
            return self._identify_namespace(cns, params)
        raise invalid_field(f"identify CNS 0x{cns:02x} not supported")

    def _identify_csi_controller(self, csi: int) -> bytes:
        if csi == CommandSetIdentifier.NVM:
            return bytes(IDENTIFY_SIZE)
        for ns in self.subsystem.namespaces.values():
            if ns.csi == csi:
                return ns.identify_csi_controller()
        raise invalid_field(f"identify controller for CSI {csi}: no such namespace here")

    def _identify_namespace(self, cns: int, params: IdentifyParameters) -> bytes:
        if params.nsid in (0, NSID_BROADCAST):
            raise _invalid_namespace(params.nsid)
        ns = self.subsystem.namespaces.get(params.nsid)
        if ns is None:
            if params.nsid > self.subsystem.max_namespaces:
                raise _invalid_namespace(params.nsid)
            if cns == Cns.NAMESPACE_ID_DESCRIPTORS:
                raise _invalid_namespace(params.nsid)
            return bytes(IDENTIFY_SIZE)  # inactive namespace: zeros, success
        if cns == Cns.NAMESPACE:
            return ns.identify_namespace()
        if cns == Cns.NAMESPACE_ID_DESCRIPTORS:
            return pack_namespace_id_descriptors(
                [
                    NamespaceIdDescriptor(NamespaceIdType.NGUID, ns.uuid.bytes),
                    NamespaceIdDescriptor(NamespaceIdType.UUID, ns.uuid.bytes),
                    NamespaceIdDescriptor(NamespaceIdType.CSI, bytes([ns.csi])),
                ]
            )
        if cns == Cns.CSI_INDEPENDENT_NAMESPACE:
            return CsiIndependentNamespace(nmic=1, nstat=1).pack()
        if params.csi != ns.csi:
            raise invalid_field(f"namespace {ns.nsid} is CSI {ns.csi}, not {params.csi}")
        return ns.identify_csi_namespace()

    def identify_controller(self) -> IdentifyController:
        limits = self.limits
        nn = self.subsystem.max_namespaces
        return IdentifyController(
            sn=self.subsystem.serial_number[:20],
            mn=self.subsystem.model_number[:40],
            fr=FIRMWARE_REVISION,
            rab=6,
            cmic=0x2,
            mdts=_mdts(limits.max_transfer_size),
            cntlid=self.cntlid,
            ver=VERSION_2_0,
            ctratt=0x1,
            cntrltype=ControllerType.IO,
            acl=3,
            oaes=OAES_NAMESPACE_ATTRIBUTE_NOTICES,
            aerl=limits.max_async_events - 1,
            lpa=0x2 | 0x4,
            kas=max(1, limits.keep_alive_granularity_ms // 100),
            sqes=0x66,
            cqes=0x44,
            maxcmd=limits.max_queue_entries,
            nn=nn,
            oncs=0x0C,  # bit2 Dataset Management, bit3 Write Zeroes (block namespaces)
            vwc=0x1,  # a volatile write cache: hosts send Flush (aio bdevs' page cache)
            sgls=0x00100001 | (0x4 if self.keyed_sgls else 0),  # bit 2: keyed SGLs (RDMA)
            mnan=nn,
            subnqn=self.subsystem.nqn,
            ioccsz=(64 + limits.in_capsule_data_size_for("rdma" if self.keyed_sgls else "tcp"))
            // 16,
            iorcsz=1,
            icdoff=0,
            msdbd=1,
            ofcs=1,
        )

    def set_feature(self, params: FeatureParameters, now: float) -> int:
        fid = params.fid
        if params.save:
            raise CommandError(Status.command_specific(CommandSpecificStatus.FEATURE_NOT_SAVEABLE))
        if fid == FeatureId.NUMBER_OF_QUEUES:
            nsqr, ncqr = decode_number_of_queues(params.cdw11)
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                raise invalid_field("number of queues 65536 requested")
            if self.granted_io_queues == 0:
                self.granted_io_queues = min(nsqr + 1, ncqr + 1, self.limits.max_io_queues)
            granted = self.granted_io_queues - 1
            return encode_number_of_queues(granted, granted)
        if fid == FeatureId.KEEP_ALIVE_TIMER:
            self.kato_ms = params.cdw11
            self._last_keep_alive = now  # a new KATO starts a new period, as nvmet does
            return 0
        if fid == FeatureId.ASYNC_EVENT_CONFIGURATION:
            self.async_event_config = params.cdw11
            return 0
        if fid == FeatureId.IO_COMMAND_SET_PROFILE:
            if params.cdw11 & 0x1FF != 0:
                raise invalid_field("only I/O command set combination 0 exists")
            return 0
        ns = self._feature_namespace(params)
        if ns is not None and ns.set_feature(fid, params.cdw11):
            return 0
        raise invalid_field(f"set feature 0x{fid:02x} not supported")

    def get_feature(self, params: FeatureParameters) -> int:
        fid = params.fid
        if fid == FeatureId.NUMBER_OF_QUEUES:
            granted = max(self.granted_io_queues, 1) - 1
            if self.granted_io_queues == 0:
                granted = self.limits.max_io_queues - 1
            return encode_number_of_queues(granted, granted)
        if fid == FeatureId.KEEP_ALIVE_TIMER:
            return self.kato_ms
        if fid == FeatureId.ASYNC_EVENT_CONFIGURATION:
            return self.async_event_config
        if fid == FeatureId.IO_COMMAND_SET_PROFILE:
            return 0
        ns = self._feature_namespace(params)
        if ns is not None:
            value = ns.get_feature(fid)
            if value is not None:
                return value
        raise invalid_field(f"get feature 0x{fid:02x} not supported")

    def _feature_namespace(self, params: FeatureParameters) -> Namespace | None:
        if params.nsid in (0, NSID_BROADCAST):
            return None
        ns = self.subsystem.namespaces.get(params.nsid)
        if ns is None:
            raise _invalid_namespace(params.nsid)
        return ns

    def log_page(self, params: LogPageParameters) -> bytes:
        lid = params.lid
        if params.offset & 3:
            raise invalid_field("log page offset not dword aligned")
        if lid == LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS:
            io: dict[int, int] = {}
            for ns in self.subsystem.namespaces.values():
                if ns.csi == params.csi:
                    io.update(ns.io_command_effects())
            page = pack_commands_supported_and_effects(_ADMIN_EFFECTS, io)
        elif lid == LogPageId.ERROR:
            page = bytes(64)
        elif lid in (LogPageId.SMART, LogPageId.FIRMWARE_SLOT):
            page = bytes(512)
        elif lid == LogPageId.CHANGED_NAMESPACES:
            page = self._changed_namespace_list(clear=not params.rae)
        else:
            raise CommandError(
                Status.command_specific(CommandSpecificStatus.INVALID_LOG_PAGE),
                f"log page 0x{lid:02x}",
            )
        if params.offset > len(page):
            raise invalid_field("log page offset beyond the page")
        chunk = page[params.offset : params.offset + params.length]
        return chunk + bytes(params.length - len(chunk))

    # --- asynchronous events ----------------------------------------------------------------
    def namespace_changed(self, nsid: int) -> None:
        """A namespace was attached or detached: record it for log page 0x04 and, if the host
        enabled Namespace Attribute Notices, raise the event (masked until the log is read)."""
        if nsid not in self._changed_nsids and len(self._changed_nsids) <= (
            CHANGED_NAMESPACE_LIST_MAX
        ):
            self._changed_nsids.append(nsid)
        if not self.async_event_config & AEC_NAMESPACE_ATTRIBUTE_NOTICES:
            return
        if self._namespace_notice_masked:
            return
        self._namespace_notice_masked = True
        self._queued_events.append(NAMESPACE_ATTRIBUTE_CHANGED_EVENT)
        self._deliver_async_events()

    def _deliver_async_events(self) -> None:
        sink = self.async_event_sink
        while sink is not None and self._queued_events and self.pending_async_events:
            request = self.pending_async_events.pop(0)
            dw0 = self._queued_events.pop(0)
            self.log.info("[%d] async event 0x%08x", self.cntlid, dw0)
            sink(request, dw0)

    def _changed_namespace_list(self, *, clear: bool) -> bytes:
        nsids = sorted(self._changed_nsids)
        if len(nsids) > CHANGED_NAMESPACE_LIST_MAX:
            nsids = [NSID_BROADCAST]
        if clear:
            self._changed_nsids.clear()
            self._namespace_notice_masked = False
        return pack_namespace_list(nsids)

    def close(self) -> None:
        for closer in self.closers:
            closer()
        self.closers.clear()


def _invalid_namespace(nsid: int) -> CommandError:
    return CommandError(
        Status.generic(GenericStatus.INVALID_NAMESPACE_OR_FORMAT), f"namespace {nsid}"
    )
