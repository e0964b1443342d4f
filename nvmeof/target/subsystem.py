"""NVM subsystems and the target that holds them."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import attrs

from nvmeof.spec.fabrics import DISCOVERY_NQN

if TYPE_CHECKING:
    from nvmeof.target.auth import HostAuthConfig
    from nvmeof.target.controller import Controller
    from nvmeof.target.namespace import Namespace

log = logging.getLogger("nvmeof.target")

MAX_CNTLID = 0xFFEF  # 0xFFF0.. are reserved; 0xFFFF asks for a dynamic controller


class NamespaceExists(ValueError):
    pass


@attrs.frozen
class ListenAddress:
    """A transport address a subsystem may be reached at (SPDK's listen_address)."""

    traddr: str
    trsvcid: str
    trtype: str = "TCP"
    adrfam: str = "IPv4"


@attrs.define(eq=False)
class Subsystem:
    nqn: str
    serial_number: str = "GPUCACHE0000000001"
    model_number: str = "GPUCache KV target"
    allow_any_host: bool = True
    hosts: set[str] = attrs.Factory(set)
    # DH-HMAC-CHAP: hosts that must authenticate (nvmf_subsystem_add_host dhchap_key), by NQN.
    host_auth: dict[str, HostAuthConfig] = attrs.Factory(dict)
    max_namespaces: int = 32
    namespaces: dict[int, Namespace] = attrs.Factory(dict)
    controllers: dict[int, Controller] = attrs.Factory(dict)
    # Empty: reachable on every listener of the target (the CLI's single-subsystem default).
    listeners: list[ListenAddress] = attrs.Factory(list)
    min_cntlid: int = 1
    max_cntlid: int = MAX_CNTLID

    def host_allowed(self, hostnqn: str) -> bool:
        return self.allow_any_host or hostnqn in self.hosts

    def auth_config(self, hostnqn: str) -> HostAuthConfig | None:
        """The DH-HMAC-CHAP settings ``hostnqn`` must authenticate with, or None (no auth)."""
        return self.host_auth.get(hostnqn)

    def listener_allowed(self, address: ListenAddress | None) -> bool:
        """May a host connect through ``address`` (None: not through a listener)?"""
        return not self.listeners or address in self.listeners

    def _namespace_changed(self, nsid: int) -> None:
        for controller in list(self.controllers.values()):
            controller.namespace_changed(nsid)

    def add_namespace(self, namespace: Namespace, nsid: int | None = None) -> int:
        if nsid is None or nsid == 0:
            free = (n for n in range(1, self.max_namespaces + 1) if n not in self.namespaces)
            nsid = next(free, 0)
            if nsid == 0:
                raise NamespaceExists(f"{self.nqn}: all {self.max_namespaces} namespaces in use")
        if not 1 <= nsid <= self.max_namespaces:
            raise ValueError(f"{self.nqn}: nsid {nsid} outside 1..{self.max_namespaces}")
        if nsid in self.namespaces:
            raise NamespaceExists(f"{self.nqn}: nsid {nsid} already in use")
        namespace.nsid = nsid
        self.namespaces[nsid] = namespace
        log.info("%s: namespace %d added (csi %d)", self.nqn, nsid, namespace.csi)
        self._namespace_changed(nsid)
        return nsid

    def remove_namespace(self, nsid: int) -> Namespace:
        namespace = self.namespaces.pop(nsid)
        self._namespace_changed(nsid)
        return namespace


def transfer_size_for(max_value_length: int) -> int:
    """The smallest MDTS-expressible transfer size (2^n x 4 KiB) that carries the largest value
    with room for a client header, so KV Value Max Length never exceeds the transfer limit."""
    size = 4096
    while size < max_value_length + 4096 or size < 1 << 20:
        size *= 2
    return size


RDMA_IN_CAPSULE_DATA_SIZE = 8192


@attrs.frozen
class TargetLimits:
    """What every controller of this target advertises."""

    max_queue_entries: int = 1024  # CAP.MQES + 1
    max_io_queues: int = 64
    in_capsule_data_size: int = 8192  # I/O queues: IOCCSZ = (64 + this) / 16 (RDMA: capped)
    max_transfer_size: int = 128 << 20  # 2^MDTS * 4 KiB
    maxh2cdata: int = 1 << 20
    keep_alive_granularity_ms: int = 1000  # KAS, in 100 ms units on the wire
    max_async_events: int = 4  # AERL + 1
    # Resource limits against slow or hostile peers (docs/security.md).
    max_connections: int = 4096  # TCP connections (queues) served at once, all hosts together
    max_in_flight_bytes: int = 256 << 20  # host-to-controller data buffered per connection
    header_timeout: float = 30.0  # seconds a peer may stall before its ICReq or inside a PDU

    def in_capsule_data_size_for(self, trtype: str) -> int:
        """An RDMA queue posts a receive buffer of this size for every entry, so it keeps to a
        small one; TCP receives in-capsule data only when it comes."""
        if trtype == "rdma":
            return min(self.in_capsule_data_size, RDMA_IN_CAPSULE_DATA_SIZE)
        return self.in_capsule_data_size


class Target:
    """All subsystems of one target process, and the controller IDs they share."""

    def __init__(self, limits: TargetLimits | None = None) -> None:
        self.limits = limits or TargetLimits()
        self.subsystems: dict[str, Subsystem] = {}
        self._cntlids = itertools.cycle(range(1, MAX_CNTLID + 1))
        # Discovery (nvmeof.target.discovery): the well-known subsystem, where this target listens
        # (I/O listeners; dedicated discovery listeners), and the discovery log's generation.
        self.discovery_subsystem = Subsystem(nqn=DISCOVERY_NQN, max_namespaces=0)
        self.listen_addresses: list[ListenAddress] = []
        self.discovery_addresses: list[ListenAddress] = []
        self.discovery_genctr = 0
        self.discovery_fingerprint: object = None

    def add_subsystem(self, subsystem: Subsystem) -> Subsystem:
        if subsystem.nqn in self.subsystems or subsystem.nqn == DISCOVERY_NQN:
            raise ValueError(f"subsystem {subsystem.nqn} already exists")
        self.subsystems[subsystem.nqn] = subsystem
        return subsystem

    def restrict_cntlids(self, residue: int, modulus: int) -> None:
        """Allocate only controller IDs with ``cntlid % modulus == residue``: each worker process
        of one target (``nvmeof.target.workers``) owns one residue class, so a CNTLID names its
        worker."""
        if not 0 <= residue < modulus:
            raise ValueError(f"residue {residue} not in 0..{modulus - 1}")
        first = residue or modulus
        self._cntlids = itertools.cycle(range(first, MAX_CNTLID + 1, modulus))

    def allocate_cntlid(self, subsystem: Subsystem) -> int:
        for _ in range(MAX_CNTLID):
            cntlid = next(self._cntlids)
            if cntlid in subsystem.controllers:
                continue
            if subsystem.min_cntlid <= cntlid <= subsystem.max_cntlid:
                return cntlid
        raise RuntimeError("no free controller ID")
