"""The discovery controller: the well-known discovery subsystem and its log page (0x70).

A host connects to ``nqn.2014-08.org.nvmexpress.discovery`` (on the dedicated discovery port, 8009
by default, or on any I/O listener), gets a controller of type 2 with an admin queue only, and reads
the discovery log: one entry per (subsystem it may connect to, listener that subsystem is reachable
on), plus one "current discovery subsystem" entry per dedicated discovery listener (as SPDK does).

The log's generation counter lives on the ``Target``. It is bumped whenever what the log would say
changes (subsystems, their hosts and listeners, the target's listeners), which is detected from a
fingerprint of that state, so code that edits subsystems needs no hook to keep hosts honest.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING

import attrs

from nvmeof.errors import CommandError
from nvmeof.spec.discovery import (
    TREQ_SQ_FLOW_CONTROL_DISABLE,
    AddressFamily,
    DiscoveryEntry,
    EntryFlags,
    SubsystemType,
    TransportType,
    pack_discovery_log,
    tcp_tsas,
)
from nvmeof.spec.fabrics import DISCOVERY_NQN
from nvmeof.spec.features import FeatureId, FeatureParameters, LogPageId, LogPageParameters
from nvmeof.spec.identify import (
    LPA_EXTENDED_DATA,
    Cns,
    ControllerType,
    IdentifyController,
    IdentifyParameters,
)
from nvmeof.spec.status import CommandSpecificStatus, Status
from nvmeof.target.controller import Controller, invalid_field
from nvmeof.target.subsystem import ListenAddress, Subsystem

if TYPE_CHECKING:
    from nvmeof.target.subsystem import Target, TargetLimits

log = logging.getLogger("nvmeof.target.discovery")

DEFAULT_DISCOVERY_PORT = 8009
DISCOVERY_SERIAL_NUMBER = "GPUCACHEDISCOVERY001"
DISCOVERY_MODEL_NUMBER = "GPUCache discovery controller"

_TRTYPES = {"TCP": TransportType.TCP, "RDMA": TransportType.RDMA, "FC": TransportType.FC}
_ADRFAMS = {
    "IPV4": AddressFamily.IPV4,
    "IPV6": AddressFamily.IPV6,
    "IB": AddressFamily.IB,
    "FC": AddressFamily.FC,
}


def _visible_address(traddr: str) -> str:
    """Never report a wildcard address (Linux nvmet substitutes a local one too)."""
    try:
        wildcard = ipaddress.ip_address(traddr).is_unspecified
    except ValueError:
        return traddr
    if not wildcard:
        return traddr
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _entry(
    address: ListenAddress, *, subnqn: str, subtype: SubsystemType, portid: int
) -> DiscoveryEntry:
    trtype = _TRTYPES.get(address.trtype.upper(), TransportType.TCP)
    adrfam = _ADRFAMS.get(address.adrfam.upper(), AddressFamily.IPV4)
    if ":" in address.traddr:
        adrfam = AddressFamily.IPV6
    current = subtype == SubsystemType.CURRENT_DISCOVERY
    return DiscoveryEntry(
        trtype=trtype,
        adrfam=adrfam,
        subtype=subtype,
        # No secure channel requirement; SQ flow control may be disabled (our queues honour it).
        treq=TREQ_SQ_FLOW_CONTROL_DISABLE,
        portid=portid,
        eflags=(
            EntryFlags.DUPLICATE_RETURNED_INFO | EntryFlags.EXPLICIT_PERSISTENT_CONNECTION
            if current
            else EntryFlags.NONE
        ),
        trsvcid=address.trsvcid,
        subnqn=subnqn,
        traddr=_visible_address(address.traddr),
        tsas=tcp_tsas() if trtype == TransportType.TCP else bytes(256),
    )


def discovery_entries(target: Target, hostnqn: str) -> list[DiscoveryEntry]:
    """What ``hostnqn`` may see: each allowed subsystem on each listener that serves it."""
    io_ports = list(target.listen_addresses)
    portids = {address: i + 1 for i, address in enumerate(io_ports)}
    entries: list[DiscoveryEntry] = []
    for nqn in sorted(target.subsystems):
        subsystem = target.subsystems[nqn]
        if not subsystem.host_allowed(hostnqn):
            continue
        for address in subsystem.listeners or io_ports:
            portid = portids.get(address, len(portids) + 1)
            portids.setdefault(address, portid)
            entries.append(_entry(address, subnqn=nqn, subtype=SubsystemType.NVM, portid=portid))
    for address in target.discovery_addresses:
        portid = portids.setdefault(address, len(portids) + 1)
        entries.append(
            _entry(
                address,
                subnqn=DISCOVERY_NQN,
                subtype=SubsystemType.CURRENT_DISCOVERY,
                portid=portid,
            )
        )
    return entries


def _fingerprint(target: Target) -> Hashable:
    subsystems = tuple(
        (
            nqn,
            s.allow_any_host,
            tuple(sorted(s.hosts)),
            tuple(s.listeners),
        )
        for nqn, s in sorted(target.subsystems.items())
    )
    return (subsystems, tuple(target.listen_addresses), tuple(target.discovery_addresses))


def discovery_generation(target: Target) -> int:
    """The discovery log's GENCTR, bumped once for every change seen since the last read."""
    fingerprint = _fingerprint(target)
    if fingerprint != target.discovery_fingerprint:
        target.discovery_fingerprint = fingerprint
        target.discovery_genctr += 1
    return target.discovery_genctr


def discovery_log(target: Target, hostnqn: str) -> bytes:
    return pack_discovery_log(discovery_generation(target), discovery_entries(target, hostnqn))


def read_log(page: bytes, offset: int, length: int) -> bytes:
    """``length`` bytes of ``page`` from ``offset``, zero-filled past its end (as nvmet does)."""
    if offset & 3 or length & 3:
        raise invalid_field("discovery log offset and length must be dword aligned")
    chunk = page[offset : offset + length]
    return chunk + bytes(length - len(chunk))


class DiscoveryController(Controller):
    """A discovery controller (CNTRLTYPE 2): admin queue only, Identify and the discovery log."""

    def __init__(
        self,
        *,
        target: Target,
        cntlid: int,
        subsystem: Subsystem,
        limits: TargetLimits,
        hostnqn: str,
        hostid: bytes,
        kato_ms: int,
        now: float,
    ) -> None:
        super().__init__(
            cntlid=cntlid,
            subsystem=subsystem,
            limits=limits,
            hostnqn=hostnqn,
            hostid=hostid,
            kato_ms=kato_ms,
            now=now,
        )
        self.target = target

    def __repr__(self) -> str:
        return f"<DiscoveryController {self.cntlid} host={self.hostnqn}>"

    def identify(self, params: IdentifyParameters) -> bytes:
        if params.cns != Cns.CONTROLLER:
            raise invalid_field(f"identify CNS 0x{params.cns:02x} on a discovery controller")
        return self.identify_controller().pack()

    def identify_controller(self) -> IdentifyController:
        return attrs.evolve(
            super().identify_controller(),
            cntrltype=ControllerType.DISCOVERY,
            cmic=0,
            mdts=0,
            nn=0,
            mnan=0,
            lpa=LPA_EXTENDED_DATA,
            # No namespaces here, and no discovery-log-change events sent (yet): advertise none,
            # so hosts do not wait for them (Linux submits AERs only for advertised OAES bits).
            oaes=0,
            aerl=self.limits.max_async_events - 1,
            subnqn=DISCOVERY_NQN,
            sn=DISCOVERY_SERIAL_NUMBER,
            mn=DISCOVERY_MODEL_NUMBER,
        )

    def set_feature(self, params: FeatureParameters, now: float) -> int:
        if params.fid not in (FeatureId.KEEP_ALIVE_TIMER, FeatureId.ASYNC_EVENT_CONFIGURATION):
            raise invalid_field(f"set feature 0x{params.fid:02x} on a discovery controller")
        return super().set_feature(params, now)

    def get_feature(self, params: FeatureParameters) -> int:
        if params.fid not in (FeatureId.KEEP_ALIVE_TIMER, FeatureId.ASYNC_EVENT_CONFIGURATION):
            raise invalid_field(f"get feature 0x{params.fid:02x} on a discovery controller")
        return super().get_feature(params)

    def log_page(self, params: LogPageParameters) -> bytes:
        if params.lid != LogPageId.DISCOVERY:
            raise CommandError(
                Status.command_specific(CommandSpecificStatus.INVALID_LOG_PAGE),
                f"log page 0x{params.lid:02x} on a discovery controller",
            )
        page = discovery_log(self.target, self.hostnqn)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "[%d] discovery log for %s: %d bytes at %d of %d",
                self.cntlid, self.hostnqn, params.length, params.offset, len(page),
            )  # fmt: skip
        return read_log(page, params.offset, params.length)


def discovery_listen_addresses(addresses: Iterable[tuple[str, int]]) -> list[ListenAddress]:
    return [ListenAddress(traddr=host, trsvcid=str(port)) for host, port in addresses]


def controller_factory(target: Target, subsystem: Subsystem) -> Callable[..., Controller]:
    """What Connect builds for an admin queue: a discovery controller for the discovery NQN."""
    if subsystem is target.discovery_subsystem:
        return functools.partial(DiscoveryController, target=target)
    return Controller
