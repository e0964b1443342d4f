"""The target application, as SPDK's ``nvmf_tgt``: a ``Target``, its bdevs, its listeners and the
JSON-RPC server, changed live by SPDK's RPC methods (``nvmeof.target.rpc_methods``, plus those
that other packages register, such as kvext's KV bdevs) or by a JSON config replaying them
(``nvmeof.target.config``).

Listeners are per subsystem, as in SPDK: ``nvmf_subsystem_add_listener`` starts listening on an
address unless something already listens there (one socket serves every subsystem listing it),
and a subsystem that lists listeners refuses a Connect that came in through any other address.
Addresses the command line gives (``--listen``) are the target's own: a subsystem with no
listeners (the command line's default subsystem) is reachable on every address.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import attrs

from nvmeof.spec.dhchap import DhchapSecret, SecretFormatError
from nvmeof.spec.fabrics import DISCOVERY_NQN
from nvmeof.target.bdev.base import Bdev, BdevExists, BdevNotFound, BdevRegistry
from nvmeof.target.rpc import (
    RpcError,
    RpcErrorCode,
    RpcMethods,
    RpcState,
    rpc_listener,
    serve_rpc,
    state_error,
)
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import (
    ListenAddress,
    NamespaceExists,
    Subsystem,
    Target,
)
from nvmeof.transport.sockets import TcpListener

log = logging.getLogger("nvmeof.target.app")

MAX_NQN_LENGTH = 223


# --- state the RPC methods keep beside the core's ------------------------------------------------
@attrs.frozen(kw_only=True)
class TransportOptions:
    """``nvmf_create_transport``: the fields SPDK reports, mapped onto ``TargetLimits``."""

    trtype: str = "TCP"
    max_queue_depth: int
    max_io_qpairs_per_ctrlr: int
    in_capsule_data_size: int
    max_io_size: int
    max_aq_depth: int = 128
    iobuf_small_cache_size: int = 4294967295
    iobuf_large_cache_size: int = 4294967295
    dif_insert_or_strip: bool = False
    zcopy: bool = False
    c2h_success: bool = True
    sock_priority: int = 0
    abort_timeout_sec: int = 1
    ack_timeout: int = 0
    data_wr_pool_size: int = 0
    disable_command_passthru: bool = False
    kas: int
    min_kato: int = 10000

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


@attrs.define(kw_only=True)
class SubsystemOptions:
    """SPDK subsystem options GPUCache has no behaviour for; kept to report and save them."""

    dmrsl: int = 0
    wzsl: int = 0


@attrs.define
class _Served:
    listener: TcpListener
    scope: anyio.CancelScope
    own: bool = False  # the target's own (--listen): stays while the process runs


def normalize_address(
    trtype: str, traddr: str, trsvcid: str | None, adrfam: str | None
) -> ListenAddress:
    """SPDK's spelling of an address (``TCP``, ``IPv4``), whatever case the client used."""
    if trtype.upper() != "TCP":
        raise RpcError.invalid_params(f"transport {trtype} is not supported (TCP only)")
    family = (adrfam or ("IPv6" if ":" in traddr else "IPv4")).upper()
    names = {"IPV4": "IPv4", "IPV6": "IPv6"}
    if family not in names:
        raise RpcError.invalid_params(f"address family {adrfam} is not supported")
    if trsvcid is None or not trsvcid.isdigit() or int(trsvcid) > 0xFFFF:
        raise RpcError.invalid_params(f"trsvcid {trsvcid!r} is not a TCP port")
    return ListenAddress(
        traddr=traddr, trsvcid=str(int(trsvcid)), trtype="TCP", adrfam=names[family]
    )


def address_json(address: ListenAddress) -> dict[str, object]:
    return {
        "trtype": address.trtype,
        "adrfam": address.adrfam,
        "traddr": address.traddr,
        "trsvcid": address.trsvcid,
    }


class TargetApp:
    """One target process: the core ``Target``, bdevs, listeners, RPC (see the module doc)."""

    def __init__(
        self,
        target: Target | None = None,
        *,
        methods: RpcMethods,
        allow_digests: bool = True,
    ) -> None:
        self.target = target or Target()
        self.server = TargetServer(self.target, allow_digests=allow_digests)
        self.bdevs = BdevRegistry()
        self.methods = methods
        self.transports: dict[str, TransportOptions] = {}
        self.subsystem_options: dict[str, SubsystemOptions] = {}
        self.namespace_bdevs: dict[tuple[str, int], str] = {}
        # keyring_file_add_key: name -> (path, secret); add_host's key references, for save_config
        self.keyring: dict[str, tuple[str, DhchapSecret]] = {}
        self.host_key_refs: dict[tuple[str, str], dict[str, str]] = {}
        self.state = RpcState.STARTUP
        # Run by framework_start_init (or start()), before the state becomes RUNTIME.
        self.init_steps: list[Callable[[], Awaitable[object]]] = []
        self._served: dict[ListenAddress, _Served] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._initialized: anyio.Event | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TargetApp]:
        """Listeners and the RPC server live in here; bdevs are closed on the way out."""
        self._initialized = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One failure (a busy port, a bad config entry) reads better as itself.
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None
            raise
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                for bdev in self.bdevs:
                    await bdev.aclose()

    async def start(self) -> None:
        """Finish initialization (``framework_start_init``): run ``init_steps``, go RUNTIME."""
        if self.state == RpcState.RUNTIME:
            return
        steps, self.init_steps = self.init_steps, []
        for step in steps:
            await step()
        self.state = RpcState.RUNTIME
        if self._initialized is not None:
            self._initialized.set()

    async def wait_initialized(self) -> None:
        if self.state != RpcState.RUNTIME:
            assert self._initialized is not None, "TargetApp.running() is not entered"
            await self._initialized.wait()

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("TargetApp.running() is not entered")
        return self._tg

    async def serve_rpc(self, path: str) -> None:
        """Start answering JSON-RPC on the Unix socket ``path`` (``RpcSocketInUse`` if taken)."""
        await self.task_group.start(self._serve_rpc, path)

    async def _serve_rpc(
        self, path: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with rpc_listener(path) as listener:
            log.info("JSON-RPC on %s", path)
            task_status.started()
            await serve_rpc(listener, self.call)

    # --- method dispatch ------------------------------------------------------------------------
    async def call(self, method: str, params: object = None, *, check_state: bool = True) -> object:
        """Run one RPC method, as the socket would (``check_state=False``: a config file's)."""
        found = self.methods.get(method)
        if found is None:
            raise RpcError(RpcErrorCode.METHOD_NOT_FOUND, "Method not found", method)
        if check_state and not self.state & found.states:
            raise state_error(self.state)
        return await found.handler(self, params)

    # --- listeners ------------------------------------------------------------------------------
    async def listen(self, address: ListenAddress, *, own: bool = False) -> ListenAddress:
        """Listen on ``address`` unless already listening; gives the address as bound (port 0
        becomes the port the system chose)."""
        served = self._served.get(address)
        if served is not None:
            served.own = served.own or own
            return address
        listener = self.server.listen(address.traddr, int(address.trsvcid))
        if address.trsvcid == "0":
            address = attrs.evolve(address, trsvcid=str(listener.port))
        await self.task_group.start(self._serve_listener, listener, address, own)
        return address

    async def _serve_listener(
        self,
        listener: TcpListener,
        address: ListenAddress,
        own: bool,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.CancelScope() as scope:
            self._served[address] = _Served(listener, scope, own)
            try:
                await self.server.serve_listener(
                    listener, address=address, task_status=_Started(task_status)
                )
            finally:
                self._served.pop(address, None)

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return list(self._served)

    def _stop_unused_listener(self, address: ListenAddress) -> None:
        served = self._served.get(address)
        if served is None or served.own:
            return
        if any(address in s.listeners for s in self.target.subsystems.values()):
            return
        log.info("no subsystem listens on %s:%s any more", address.traddr, address.trsvcid)
        served.scope.cancel()

    # --- subsystems -----------------------------------------------------------------------------
    def subsystem(self, nqn: str) -> Subsystem:
        found = self.target.subsystems.get(nqn)
        if found is None:
            raise RpcError.invalid_params(
                message=f"Unable to find subsystem with NQN {nqn}", detail=nqn
            )
        return found

    def create_subsystem(
        self, subsystem: Subsystem, options: SubsystemOptions | None = None
    ) -> Subsystem:
        nqn = subsystem.nqn
        if (
            nqn in self.target.subsystems
            or nqn == DISCOVERY_NQN
            or not nqn.startswith("nqn.")
            or len(nqn.encode()) > MAX_NQN_LENGTH
        ):
            raise RpcError.invalid_params(
                message=f"Unable to create subsystem {nqn}",
                detail="exists already" if nqn in self.target.subsystems else "invalid NQN",
            )
        self.target.add_subsystem(subsystem)
        self.subsystem_options[nqn] = options or SubsystemOptions()
        log.info("subsystem %s created", nqn)
        return subsystem

    def delete_subsystem(self, nqn: str) -> None:
        subsystem = self.subsystem(nqn)
        for controller in list(subsystem.controllers.values()):
            controller.close()
        del self.target.subsystems[nqn]
        self.subsystem_options.pop(nqn, None)
        for key in [k for k in self.namespace_bdevs if k[0] == nqn]:
            del self.namespace_bdevs[key]
        for address in subsystem.listeners:
            self._stop_unused_listener(address)
        log.info("subsystem %s deleted", nqn)

    async def add_listener(self, nqn: str, address: ListenAddress) -> ListenAddress:
        subsystem = self.subsystem(nqn)
        if address.trtype not in self.transports:
            raise RpcError.invalid_params(
                detail=f"the {address.trtype} transport must be created first"
            )
        if address in subsystem.listeners:
            raise RpcError.invalid_params(detail=f"{nqn} already listens on {address}")
        try:
            bound = await self.listen(address)
        except OSError as exc:
            raise RpcError(
                RpcErrorCode.INTERNAL_ERROR,
                "Invalid parameters",
                f"cannot listen on {address.traddr}:{address.trsvcid}: {exc}",
            ) from exc
        subsystem.listeners.append(bound)
        log.info("%s: listening on %s:%s", nqn, bound.traddr, bound.trsvcid)
        return bound

    def remove_listener(self, nqn: str, address: ListenAddress) -> None:
        subsystem = self.subsystem(nqn)
        if address not in subsystem.listeners:
            raise RpcError.invalid_params(detail=f"{nqn} has no listener {address}")
        subsystem.listeners.remove(address)
        for controller in list(subsystem.controllers.values()):
            if controller.listen_address == address:
                controller.close()
        self._stop_unused_listener(address)

    def add_namespace(
        self, nqn: str, bdev_name: str, *, nsid: int | None = None, ns_uuid: uuid.UUID | None
    ) -> int:
        subsystem = self.subsystem(nqn)
        try:
            bdev = self.bdevs.get(bdev_name)
        except BdevNotFound:
            raise RpcError(
                RpcErrorCode.INTERNAL_ERROR, "Invalid parameters", f"no bdev {bdev_name}"
            ) from None
        if self.claimed_by(bdev_name) is not None:
            raise RpcError(
                RpcErrorCode.INTERNAL_ERROR,
                "Invalid parameters",
                f"bdev {bdev_name} is already a namespace of {self.claimed_by(bdev_name)}",
            )
        if nsid is not None and (nsid in subsystem.namespaces or nsid > subsystem.max_namespaces):
            raise RpcError(
                RpcErrorCode.INTERNAL_ERROR, "Invalid parameters", f"nsid {nsid} is not free"
            )
        namespace = bdev.make_namespace()
        if ns_uuid is not None:
            namespace.uuid = ns_uuid
        try:
            added = subsystem.add_namespace(namespace, nsid)
        except (NamespaceExists, ValueError) as exc:
            raise RpcError(RpcErrorCode.INTERNAL_ERROR, "Invalid parameters", str(exc)) from exc
        self.namespace_bdevs[(nqn, added)] = bdev_name
        return added

    def remove_namespace(self, nqn: str, nsid: int) -> None:
        subsystem = self.subsystem(nqn)
        if nsid not in subsystem.namespaces:
            raise RpcError.invalid_params(detail=f"{nqn} has no namespace {nsid}")
        subsystem.remove_namespace(nsid)
        self.namespace_bdevs.pop((nqn, nsid), None)
        log.info("%s: namespace %d removed", nqn, nsid)

    def claimed_by(self, bdev_name: str) -> str | None:
        for (nqn, nsid), name in self.namespace_bdevs.items():
            if name == bdev_name:
                return f"{nqn} namespace {nsid}"
        return None

    def remove_host(self, nqn: str, host: str) -> None:
        subsystem = self.subsystem(nqn)
        subsystem.hosts.discard(host)
        subsystem.host_auth.pop(host, None)
        self.host_key_refs.pop((nqn, host), None)
        for controller in list(subsystem.controllers.values()):
            if controller.hostnqn == host:
                controller.close()

    # --- keys (SPDK keyring_file) ---------------------------------------------------------------
    def add_key_file(self, name: str, path: str) -> None:
        """Register the DH-HMAC-CHAP secret in ``path`` (mode 0600, as SPDK insists) as ``name``."""
        if name in self.keyring:
            raise RpcError.errno(errno.EEXIST, f"key {name} already exists")
        try:
            mode = os.stat(path).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise RpcError.errno(errno.EPERM, f"{path}: key files must be mode 0600")
            with open(path, encoding="ascii") as f:
                secret = DhchapSecret.parse(f.read())
        except (OSError, UnicodeDecodeError, SecretFormatError) as exc:
            raise RpcError.invalid_params(detail=f"{path}: {exc}") from exc
        self.keyring[name] = (path, secret)

    def resolve_key(self, ref: str) -> DhchapSecret:
        """A keyring name, or (our extension) the ``DHHC-1:hh:...:`` secret itself."""
        if ref.startswith("DHHC-1:"):
            try:
                return DhchapSecret.parse(ref)
            except SecretFormatError as exc:
                raise RpcError.invalid_params(detail=str(exc)) from exc
        entry = self.keyring.get(ref)
        if entry is None:
            raise RpcError.invalid_params(detail=f"Could not find key {ref}")
        return entry[1]

    # --- bdevs ----------------------------------------------------------------------------------
    def add_bdev(self, bdev: Bdev) -> str:
        try:
            self.bdevs.add(bdev)
        except BdevExists as exc:
            raise RpcError.errno(errno.EEXIST, str(exc)) from exc
        return bdev.name

    async def delete_bdev(self, name: str, kind: type[Any]) -> None:
        """Delete a bdev of type ``kind``; namespaces made of it go first (hot remove, with
        the Namespace Attribute Changed event that raises, as in SPDK)."""
        try:
            bdev = self.bdevs.get(name)
        except BdevNotFound:
            raise RpcError.errno(errno.ENODEV, f"no bdev {name}") from None
        if not isinstance(bdev, kind):
            raise RpcError.errno(errno.ENODEV, f"bdev {name} is not a {kind.__name__}")
        for (nqn, nsid), bdev_name in list(self.namespace_bdevs.items()):
            if bdev_name == name:
                self.remove_namespace(nqn, nsid)
        self.bdevs.remove(name)
        await bdev.aclose()
        log.info("bdev %s deleted", name)

    def unique_bdev_name(self, prefix: str) -> str:
        names = {b.name for b in self.bdevs}
        return next(f"{prefix}{i}" for i in range(len(names) + 1) if f"{prefix}{i}" not in names)

    # --- what the RPC methods report ------------------------------------------------------------
    def describe_bdev(self, bdev: Bdev) -> dict[str, object]:
        entry = bdev.describe()
        claimed = self.claimed_by(bdev.name) is not None
        if "claimed" in entry:
            entry["claimed"] = claimed
            if claimed:
                entry["claim_type"] = "exclusive_write"
            else:
                entry.pop("claim_type", None)
        return entry

    def describe_subsystem(self, subsystem: Subsystem) -> dict[str, object]:
        options = self.subsystem_options.get(subsystem.nqn, SubsystemOptions())
        namespaces = []
        for nsid, namespace in sorted(subsystem.namespaces.items()):
            bdev_name = self.namespace_bdevs.get((subsystem.nqn, nsid), "")
            namespaces.append(
                {
                    "nsid": nsid,
                    "bdev_name": bdev_name,
                    "name": bdev_name,
                    "nguid": namespace.uuid.hex.upper(),
                    "uuid": str(namespace.uuid),
                }
            )
        return {
            "nqn": subsystem.nqn,
            "subtype": "NVMe",
            "listen_addresses": [address_json(a) for a in subsystem.listeners],
            "allow_any_host": subsystem.allow_any_host,
            "hosts": [
                {"nqn": h, **self.host_key_refs.get((subsystem.nqn, h), {})}
                for h in sorted(subsystem.hosts)
            ],
            "serial_number": subsystem.serial_number,
            "model_number": subsystem.model_number,
            "max_namespaces": subsystem.max_namespaces,
            "passthrough": False,
            "min_cntlid": subsystem.min_cntlid,
            "max_cntlid": subsystem.max_cntlid,
            "dmrsl": options.dmrsl,
            "wzsl": options.wzsl,
            "namespaces": namespaces,
        }

    def describe_discovery(self) -> dict[str, object]:
        return {
            "nqn": DISCOVERY_NQN,
            "subtype": "Discovery",
            "listen_addresses": [address_json(a) for a in self.target.discovery_addresses],
            "allow_any_host": True,
            "hosts": [],
        }

    def stats(self) -> dict[str, object]:
        controllers = [c for s in self.target.subsystems.values() for c in s.controllers.values()]
        admin = len(controllers)
        io = sum(len(c.io_queues) for c in controllers)
        return {
            "tick_rate": 1_000_000_000,
            "poll_groups": [
                {
                    "name": "nvmf_tgt_poll_group_000",
                    "admin_qpairs": admin,
                    "io_qpairs": io,
                    "current_admin_qpairs": admin,
                    "current_io_qpairs": io,
                    "pending_bdev_io": 0,
                    "completed_nvme_io": 0,
                    "transports": [{"trtype": t} for t in self.transports],
                }
            ],
        }

    # --- save_config ----------------------------------------------------------------------------
    def bdev_config(self) -> list[dict[str, object]]:
        return [bdev.config_entry() for bdev in self.bdevs]

    def nvmf_config(self) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = [
            {"method": "nvmf_create_transport", "params": t.to_json()}
            for t in self.transports.values()
        ]
        for nqn, subsystem in self.target.subsystems.items():
            options = self.subsystem_options.get(nqn, SubsystemOptions())
            entries.append(
                {
                    "method": "nvmf_create_subsystem",
                    "params": {
                        "nqn": nqn,
                        "allow_any_host": subsystem.allow_any_host,
                        "serial_number": subsystem.serial_number,
                        "model_number": subsystem.model_number,
                        "max_namespaces": subsystem.max_namespaces,
                        "min_cntlid": subsystem.min_cntlid,
                        "max_cntlid": subsystem.max_cntlid,
                        "ana_reporting": False,
                        "dmrsl": options.dmrsl,
                        "wzsl": options.wzsl,
                        "passthrough": False,
                        "enable_nssr": False,
                    },
                }
            )
            entries += [
                {
                    "method": "nvmf_subsystem_add_host",
                    "params": {"nqn": nqn, "host": host, **self.host_key_refs.get((nqn, host), {})},
                }
                for host in sorted(subsystem.hosts)
            ]
            for nsid, namespace in sorted(subsystem.namespaces.items()):
                bdev_name = self.namespace_bdevs.get((nqn, nsid))
                if bdev_name is None:
                    log.warning("save_config: %s namespace %d has no bdev, left out", nqn, nsid)
                    continue
                ns_params = {
                    "nsid": nsid,
                    "bdev_name": bdev_name,
                    "nguid": namespace.uuid.hex.upper(),
                    "uuid": str(namespace.uuid),
                    "no_auto_visible": False,
                }
                entries.append(
                    {
                        "method": "nvmf_subsystem_add_ns",
                        "params": {"nqn": nqn, "namespace": ns_params},
                    }
                )
            entries += [
                {
                    "method": "nvmf_subsystem_add_listener",
                    "params": {
                        "nqn": nqn,
                        "listen_address": address_json(address),
                        "secure_channel": False,
                    },
                }
                for address in subsystem.listeners
            ]
        return entries

    def config_sections(self) -> dict[str, list[dict[str, object]]]:
        sections = {"bdev": self.bdev_config(), "nvmf": self.nvmf_config()}
        if self.keyring:  # before nvmf, whose add_host entries name these keys
            keys: list[dict[str, object]] = [
                {"method": "keyring_file_add_key", "params": {"name": name, "path": path}}
                for name, (path, _) in sorted(self.keyring.items())
            ]
            sections = {"keyring": keys, **sections}
        return sections

    def save_config(self) -> dict[str, object]:
        return {
            "subsystems": [
                {"subsystem": name, "config": config}
                for name, config in self.config_sections().items()
            ]
        }


class _Started:
    """Adapts ``serve_listener``'s started((host, port)) to a plain started()."""

    def __init__(self, status: anyio.abc.TaskStatus[None]) -> None:
        self._status = status

    def started(self, value: object = None) -> None:
        self._status.started()


__all__ = [
    "SubsystemOptions",
    "TargetApp",
    "TransportOptions",
    "normalize_address",
]
