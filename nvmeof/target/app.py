"""The target application, as SPDK's ``nvmf_tgt``: a ``Target``, its bdevs, its listeners and the
JSON-RPC server, changed live by SPDK's RPC methods (registered here, ``core_methods()``) or by
a JSON config replaying them (``nvmeof.target.config``).

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
from nvmeof.target.auth import HostAuthConfig
from nvmeof.target.bdev.base import Bdev, BdevExists, BdevNotFound, BdevRegistry
from nvmeof.target.rpc import (
    BOTH_STATES,
    RpcError,
    RpcErrorCode,
    RpcMethods,
    RpcState,
    decode_params,
    no_params,
    rpc_listener,
    serve_rpc,
    state_error,
)
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import (
    MAX_CNTLID,
    ListenAddress,
    NamespaceExists,
    Subsystem,
    Target,
)
from nvmeof.transport.sockets import TcpListener

log = logging.getLogger("nvmeof.target.app")

VERSION = (0, 1, 0, "")
TARGET_NAME = "nvmf_tgt"  # SPDK's default target; the only one a GPUCache process has
MAX_NQN_LENGTH = 223
SPDK_DEFAULT_SERIAL = "00000000000000000000"


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
        methods: RpcMethods | None = None,
        allow_digests: bool = True,
    ) -> None:
        self.target = target or Target()
        self.server = TargetServer(self.target, allow_digests=allow_digests)
        self.bdevs = BdevRegistry()
        self.methods = methods or core_methods()
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


# --- the core RPC methods -------------------------------------------------------------------------
def _decode_failed(detail: str) -> RpcError:
    return RpcError.decode_failed(detail)


def _invalid(detail: str) -> RpcError:
    return RpcError.invalid_params(detail)


def _check_target(tgt_name: str | None) -> None:
    if tgt_name not in (None, TARGET_NAME):
        raise RpcError.invalid_params(message="Unable to find a target.", detail=str(tgt_name))


def _uuid(value: str | None, *, error: Callable[[str], RpcError]) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise error(f"{value!r} is not a UUID") from None


@attrs.frozen
class _RpcGetMethods:
    current: bool = False
    include_aliases: bool = False


@attrs.frozen
class _BdevMallocCreate:
    num_blocks: int
    block_size: int
    name: str | None = None
    uuid: str | None = None
    physical_block_size: int | None = None
    optimal_io_boundary: int | None = None
    md_size: int | None = None
    md_interleave: bool | None = None
    dif_type: int | None = None
    dif_is_head_of_md: bool | None = None
    dif_pi_format: int | None = None
    numa_id: int | None = None


@attrs.frozen
class BdevName:
    name: str


@attrs.frozen
class _BdevAioCreate:
    filename: str
    name: str
    block_size: int | None = None
    readonly: bool = False
    fallocate: bool = False
    uuid: str | None = None
    nowait: bool = False


@attrs.frozen
class _BdevGetBdevs:
    name: str | None = None
    timeout: int | None = None


@attrs.frozen
class _CreateTransport:
    trtype: str
    tgt_name: str | None = None
    max_queue_depth: int | None = None
    max_qpairs_per_ctrlr: int | None = None
    max_io_qpairs_per_ctrlr: int | None = None
    in_capsule_data_size: int | None = None
    max_io_size: int | None = None
    io_unit_size: int | None = None
    max_aq_depth: int | None = None
    num_shared_buffers: int | None = None
    buf_cache_size: int | None = None
    iobuf_small_cache_size: int | None = None
    iobuf_large_cache_size: int | None = None
    dif_insert_or_strip: bool | None = None
    zcopy: bool | None = None
    c2h_success: bool | None = None
    sock_priority: int | None = None
    abort_timeout_sec: int | None = None
    ack_timeout: int | None = None
    data_wr_pool_size: int | None = None
    disable_command_passthru: bool | None = None
    kas: int | None = None
    min_kato: int | None = None
    # RDMA / vfio-user options SPDK's client may send with their defaults: accepted, unused.
    num_cqe: int | None = None
    max_srq_depth: int | None = None
    no_srq: bool | None = None
    acceptor_backlog: int | None = None
    no_wr_batching: bool | None = None
    control_msg_num: int | None = None
    disable_mappable_bar0: bool | None = None
    disable_adaptive_irq: bool | None = None
    disable_shadow_doorbells: bool | None = None
    acceptor_poll_rate: int | None = None
    masked_oncs: list[str] | None = None
    masked_fuses: list[str] | None = None


@attrs.frozen
class _TransportQuery:
    trtype: str | None = None
    tgt_name: str | None = None


@attrs.frozen
class _CreateSubsystem:
    nqn: str
    tgt_name: str | None = None
    serial_number: str | None = None
    model_number: str | None = None
    allow_any_host: bool = False
    max_namespaces: int | None = None
    ana_reporting: bool = False
    min_cntlid: int = 1
    max_cntlid: int = MAX_CNTLID
    dmrsl: int | None = None
    wzsl: int | None = None
    passthrough: bool = False
    enable_nssr: bool = False
    admin_label: str | None = None


@attrs.frozen
class _SubsystemQuery:
    nqn: str | None = None
    tgt_name: str | None = None


@attrs.frozen
class _Nqn:
    nqn: str
    tgt_name: str | None = None


@attrs.frozen
class _ListenAddressParams:
    trtype: str
    traddr: str
    adrfam: str | None = None
    trsvcid: str | None = None

    def normalized(self) -> ListenAddress:
        return normalize_address(self.trtype, self.traddr, self.trsvcid, self.adrfam)


@attrs.frozen
class _AddListener:
    nqn: str
    listen_address: _ListenAddressParams
    tgt_name: str | None = None
    secure_channel: bool = False
    ana_state: str | None = None
    sock_impl: str | None = None
    numa_id: int | None = None


@attrs.frozen
class _RemoveListener:
    nqn: str
    listen_address: _ListenAddressParams
    tgt_name: str | None = None


@attrs.frozen
class _NamespaceParams:
    bdev_name: str
    nsid: int | None = None
    nguid: str | None = None
    eui64: str | None = None
    uuid: str | None = None
    anagrpid: int | None = None
    ptpl_file: str | None = None
    no_auto_visible: bool = False


@attrs.frozen
class _AddNamespace:
    nqn: str
    namespace: _NamespaceParams
    tgt_name: str | None = None


@attrs.frozen
class _RemoveNamespace:
    nqn: str
    nsid: int
    tgt_name: str | None = None


@attrs.frozen
class _AddHost:
    nqn: str
    host: str
    tgt_name: str | None = None
    psk: str | None = None
    dhchap_key: str | None = None
    dhchap_ctrlr_key: str | None = None


@attrs.frozen
class _KeyringFileAddKey:
    name: str
    path: str


@attrs.frozen
class _KeyringName:
    name: str


@attrs.frozen
class _RemoveHost:
    nqn: str
    host: str
    tgt_name: str | None = None
    timeout_ms: int | None = None


@attrs.frozen
class _AllowAnyHost:
    nqn: str
    allow_any_host: bool
    tgt_name: str | None = None


@attrs.frozen
class _FrameworkGetConfig:
    name: str
    with_batches: bool = False


@attrs.frozen
class _TgtOnly:
    tgt_name: str | None = None


_TRANSPORT_OPTIONS_KEPT = (
    "max_aq_depth",
    "iobuf_small_cache_size",
    "iobuf_large_cache_size",
    "dif_insert_or_strip",
    "zcopy",
    "c2h_success",
    "sock_priority",
    "abort_timeout_sec",
    "ack_timeout",
    "data_wr_pool_size",
    "disable_command_passthru",
    "min_kato",
)


def core_methods() -> RpcMethods:
    """The target's SPDK methods (framework, bdev_malloc/aio, nvmf). A fresh registry: callers
    add their own (``kvext.rpc``) before handing it to a ``TargetApp``."""
    methods = RpcMethods()
    m = methods.method

    # --- framework ------------------------------------------------------------------------------
    @m("spdk_get_version", states=BOTH_STATES)
    async def spdk_get_version(app: TargetApp, params: object) -> object:
        no_params("spdk_get_version", params)
        major, minor, patch, suffix = VERSION
        return {
            "version": f"GPUCache v{major}.{minor}.{patch}{suffix}",
            "fields": {"major": major, "minor": minor, "patch": patch, "suffix": suffix},
        }

    @m("rpc_get_methods", states=BOTH_STATES)
    async def rpc_get_methods(app: TargetApp, params: object) -> object:
        p = decode_params(_RpcGetMethods, params, error=_invalid)
        return app.methods.names(app.state if p.current else None)

    @m("framework_start_init", states=RpcState.STARTUP)
    async def framework_start_init(app: TargetApp, params: object) -> object:
        no_params("framework_start_init", params)
        await app.start()
        return True

    @m("framework_wait_init", states=BOTH_STATES)
    async def framework_wait_init(app: TargetApp, params: object) -> object:
        no_params("framework_wait_init", params)
        await app.wait_initialized()
        return True

    @m("framework_get_subsystems", states=BOTH_STATES)
    async def framework_get_subsystems(app: TargetApp, params: object) -> object:
        no_params("framework_get_subsystems", params)
        return [
            {"subsystem": "bdev", "depends_on": []},
            {"subsystem": "nvmf", "depends_on": ["bdev"]},
        ]

    @m("framework_get_config", states=BOTH_STATES)
    async def framework_get_config(app: TargetApp, params: object) -> object:
        p = decode_params(_FrameworkGetConfig, params, error=_invalid)
        sections = app.config_sections()
        if p.name not in sections:
            raise RpcError.invalid_params(message="Subsystem not found", detail=p.name)
        return sections[p.name]

    @m("save_config", states=BOTH_STATES)
    async def save_config(app: TargetApp, params: object) -> object:
        no_params("save_config", params)
        return app.save_config()

    # --- bdevs ----------------------------------------------------------------------------------
    @m("bdev_malloc_create")
    async def bdev_malloc_create(app: TargetApp, params: object) -> object:
        from nvmeof.target.bdev.malloc import MallocBdev

        p = decode_params(_BdevMallocCreate, params, error=_decode_failed)
        if p.md_size or p.dif_type or p.md_interleave:
            raise RpcError.errno(errno.ENOTSUP, "metadata and DIF are not supported")
        bdev_uuid = _uuid(p.uuid, error=_decode_failed)
        name = p.name or app.unique_bdev_name("Malloc")
        if name in {b.name for b in app.bdevs}:
            raise RpcError.errno(errno.EEXIST, f"bdev {name} exists")
        try:
            bdev = MallocBdev(name, p.num_blocks, p.block_size, uuid=bdev_uuid)
        except ValueError as exc:
            raise RpcError.errno(errno.EINVAL, str(exc)) from exc
        return app.add_bdev(bdev)

    @m("bdev_malloc_delete")
    async def bdev_malloc_delete(app: TargetApp, params: object) -> object:
        from nvmeof.target.bdev.malloc import MallocBdev

        p = decode_params(BdevName, params, error=_decode_failed)
        await app.delete_bdev(p.name, MallocBdev)
        return True

    @m("bdev_aio_create")
    async def bdev_aio_create(app: TargetApp, params: object) -> object:
        from nvmeof.target.bdev.aio import AioBdev

        p = decode_params(_BdevAioCreate, params, error=_decode_failed)
        if p.readonly:
            raise RpcError.errno(errno.ENOTSUP, "read-only aio bdevs are not supported")
        bdev_uuid = _uuid(p.uuid, error=_decode_failed)
        if p.name in {b.name for b in app.bdevs}:
            raise RpcError.errno(errno.EEXIST, f"bdev {p.name} exists")
        try:
            bdev = AioBdev(p.name, p.filename, p.block_size or 512, uuid=bdev_uuid)
        except ValueError as exc:
            raise RpcError.errno(errno.EINVAL, str(exc)) from exc
        except OSError as exc:
            raise RpcError.errno(exc.errno or errno.EIO, f"{p.filename}: {exc}") from exc
        return app.add_bdev(bdev)

    @m("bdev_aio_delete")
    async def bdev_aio_delete(app: TargetApp, params: object) -> object:
        from nvmeof.target.bdev.aio import AioBdev

        p = decode_params(BdevName, params, error=_decode_failed)
        await app.delete_bdev(p.name, AioBdev)
        return True

    @m("bdev_get_bdevs")
    async def bdev_get_bdevs(app: TargetApp, params: object) -> object:
        p = decode_params(_BdevGetBdevs, params, error=_decode_failed)
        if p.name is None:
            return [app.describe_bdev(b) for b in app.bdevs]
        try:
            return [app.describe_bdev(app.bdevs.get(p.name))]
        except BdevNotFound:
            raise RpcError.errno(errno.ENODEV, f"bdev '{p.name}' does not exist") from None

    # --- nvmf -----------------------------------------------------------------------------------
    @m("nvmf_create_transport")
    async def nvmf_create_transport(app: TargetApp, params: object) -> object:
        p = decode_params(_CreateTransport, params, error=_invalid)
        _check_target(p.tgt_name)
        trtype = p.trtype.upper()
        if trtype != "TCP":
            raise RpcError.invalid_params(detail=f"transport {p.trtype} is not supported")
        if trtype in app.transports:
            raise RpcError.invalid_params(message=f"Transport type '{trtype}' already exists")
        limits = app.target.limits
        io_qpairs = p.max_io_qpairs_per_ctrlr
        if io_qpairs is None and p.max_qpairs_per_ctrlr is not None:
            io_qpairs = p.max_qpairs_per_ctrlr - 1  # the deprecated spelling counts the admin q
        options = TransportOptions(
            max_queue_depth=p.max_queue_depth or limits.max_queue_entries,
            max_io_qpairs_per_ctrlr=io_qpairs or limits.max_io_queues,
            in_capsule_data_size=(
                limits.in_capsule_data_size
                if p.in_capsule_data_size is None
                else p.in_capsule_data_size
            ),
            max_io_size=p.max_io_size or limits.max_transfer_size,
            kas=p.kas or max(1, limits.keep_alive_granularity_ms // 100),
            **{
                name: value
                for name in _TRANSPORT_OPTIONS_KEPT
                if (value := getattr(p, name)) is not None
            },
        )
        if options.max_io_size < 4096 or options.max_queue_depth < 2:
            raise RpcError.invalid_params(detail="max_io_size >= 4096, max_queue_depth >= 2")
        app.target.limits = attrs.evolve(
            limits,
            max_queue_entries=options.max_queue_depth,
            max_io_queues=options.max_io_qpairs_per_ctrlr,
            in_capsule_data_size=options.in_capsule_data_size,
            max_transfer_size=options.max_io_size,
            keep_alive_granularity_ms=options.kas * 100,
        )
        app.transports[trtype] = options
        log.info("transport %s created", trtype)
        return True

    @m("nvmf_get_transports")
    async def nvmf_get_transports(app: TargetApp, params: object) -> object:
        p = decode_params(_TransportQuery, params, error=_invalid)
        _check_target(p.tgt_name)
        if p.trtype is None:
            return [t.to_json() for t in app.transports.values()]
        found = app.transports.get(p.trtype.upper())
        if found is None:
            raise RpcError.invalid_params(detail=f"no transport {p.trtype}")
        return [found.to_json()]

    @m("nvmf_create_subsystem")
    async def nvmf_create_subsystem(app: TargetApp, params: object) -> object:
        p = decode_params(_CreateSubsystem, params, error=_invalid)
        _check_target(p.tgt_name)
        for flag in ("ana_reporting", "passthrough", "enable_nssr"):
            if getattr(p, flag):
                raise RpcError.invalid_params(detail=f"{flag} is not supported")
        if not 1 <= p.min_cntlid <= p.max_cntlid <= MAX_CNTLID:
            raise RpcError.invalid_params(detail="need 1 <= min_cntlid <= max_cntlid <= 65519")
        for field, limit in (("serial_number", 20), ("model_number", 40)):
            value = getattr(p, field)
            if value is not None and (len(value) > limit or not value.isascii()):
                raise RpcError.invalid_params(detail=f"{field} longer than {limit} characters")
        subsystem = Subsystem(
            nqn=p.nqn,
            serial_number=p.serial_number or SPDK_DEFAULT_SERIAL,
            model_number=p.model_number or "GPUCache bdev Controller",
            allow_any_host=p.allow_any_host,
            max_namespaces=p.max_namespaces or 32,
            min_cntlid=p.min_cntlid,
            max_cntlid=p.max_cntlid,
        )
        app.create_subsystem(subsystem, SubsystemOptions(dmrsl=p.dmrsl or 0, wzsl=p.wzsl or 0))
        return True

    @m("nvmf_delete_subsystem")
    async def nvmf_delete_subsystem(app: TargetApp, params: object) -> object:
        p = decode_params(_Nqn, params, error=_invalid)
        _check_target(p.tgt_name)
        if p.nqn not in app.target.subsystems:
            raise RpcError.invalid_params(detail=f"no subsystem {p.nqn}")
        app.delete_subsystem(p.nqn)
        return True

    @m("nvmf_get_subsystems")
    async def nvmf_get_subsystems(app: TargetApp, params: object) -> object:
        p = decode_params(_SubsystemQuery, params, error=_invalid)
        _check_target(p.tgt_name)
        if p.nqn is None:
            return [app.describe_discovery()] + [
                app.describe_subsystem(s) for s in app.target.subsystems.values()
            ]
        if p.nqn == DISCOVERY_NQN:
            return [app.describe_discovery()]
        found = app.target.subsystems.get(p.nqn)
        if found is None:
            raise RpcError(RpcErrorCode.INVALID_PARAMS, "No such device", p.nqn)
        return [app.describe_subsystem(found)]

    @m("nvmf_subsystem_add_listener")
    async def nvmf_subsystem_add_listener(app: TargetApp, params: object) -> object:
        p = decode_params(_AddListener, params, error=_invalid)
        _check_target(p.tgt_name)
        if p.secure_channel:
            raise RpcError.invalid_params(detail="secure channels (TLS) are not supported")
        await app.add_listener(p.nqn, p.listen_address.normalized())
        return True

    @m("nvmf_subsystem_remove_listener")
    async def nvmf_subsystem_remove_listener(app: TargetApp, params: object) -> object:
        p = decode_params(_RemoveListener, params, error=_invalid)
        _check_target(p.tgt_name)
        app.remove_listener(p.nqn, p.listen_address.normalized())
        return True

    @m("nvmf_subsystem_add_ns")
    async def nvmf_subsystem_add_ns(app: TargetApp, params: object) -> object:
        p = decode_params(_AddNamespace, params, error=_invalid)
        _check_target(p.tgt_name)
        ns = p.namespace
        if ns.no_auto_visible:
            raise RpcError.invalid_params(detail="no_auto_visible is not supported")
        ns_uuid = _uuid(ns.uuid, error=_invalid)
        if ns_uuid is None and ns.nguid is not None:
            try:
                ns_uuid = uuid.UUID(hex=ns.nguid)
            except ValueError:
                raise _invalid(f"nguid {ns.nguid!r} is not 16 hex bytes") from None
        return app.add_namespace(p.nqn, ns.bdev_name, nsid=ns.nsid or None, ns_uuid=ns_uuid)

    @m("nvmf_subsystem_remove_ns")
    async def nvmf_subsystem_remove_ns(app: TargetApp, params: object) -> object:
        p = decode_params(_RemoveNamespace, params, error=_invalid)
        _check_target(p.tgt_name)
        app.remove_namespace(p.nqn, p.nsid)
        return True

    @m("nvmf_subsystem_add_host")
    async def nvmf_subsystem_add_host(app: TargetApp, params: object) -> object:
        p = decode_params(_AddHost, params, error=_invalid)
        _check_target(p.tgt_name)
        if p.psk:
            raise RpcError.invalid_params(detail="TLS (psk) is not supported")
        if p.dhchap_ctrlr_key and not p.dhchap_key:
            raise RpcError.invalid_params(detail="dhchap_ctrlr_key needs dhchap_key")
        if not p.host.startswith("nqn.") or len(p.host.encode()) > MAX_NQN_LENGTH:
            raise RpcError(RpcErrorCode.INTERNAL_ERROR, "Internal error", f"bad NQN {p.host}")
        subsystem = app.subsystem(p.nqn)
        if p.dhchap_key:
            host_key = app.resolve_key(p.dhchap_key)
            ctrl_key = app.resolve_key(p.dhchap_ctrlr_key) if p.dhchap_ctrlr_key else None
            subsystem.host_auth[p.host] = HostAuthConfig(host_key=host_key, ctrl_key=ctrl_key)
            refs = {"dhchap_key": p.dhchap_key}
            if p.dhchap_ctrlr_key:
                refs["dhchap_ctrlr_key"] = p.dhchap_ctrlr_key
            app.host_key_refs[(p.nqn, p.host)] = refs
        else:
            subsystem.host_auth.pop(p.host, None)
            app.host_key_refs.pop((p.nqn, p.host), None)
        subsystem.hosts.add(p.host)
        return True

    @m("keyring_file_add_key", states=BOTH_STATES)
    async def keyring_file_add_key(app: TargetApp, params: object) -> object:
        p = decode_params(_KeyringFileAddKey, params, error=_invalid)
        app.add_key_file(p.name, p.path)
        return True

    @m("keyring_file_remove_key", states=BOTH_STATES)
    async def keyring_file_remove_key(app: TargetApp, params: object) -> object:
        p = decode_params(_KeyringName, params, error=_invalid)
        if app.keyring.pop(p.name, None) is None:
            raise RpcError.errno(errno.ENOKEY, f"key {p.name} not found")
        return True

    @m("keyring_get_keys", states=BOTH_STATES)
    async def keyring_get_keys(app: TargetApp, params: object) -> object:
        no_params("keyring_get_keys", params)
        return [
            {"name": name, "path": path, "removed": False, "probed": True, "module": "keyring_file"}
            for name, (path, _) in sorted(app.keyring.items())
        ]

    @m("nvmf_subsystem_remove_host")
    async def nvmf_subsystem_remove_host(app: TargetApp, params: object) -> object:
        p = decode_params(_RemoveHost, params, error=_invalid)
        _check_target(p.tgt_name)
        app.remove_host(p.nqn, p.host)
        return True

    @m("nvmf_subsystem_allow_any_host")
    async def nvmf_subsystem_allow_any_host(app: TargetApp, params: object) -> object:
        p = decode_params(_AllowAnyHost, params, error=_invalid)
        _check_target(p.tgt_name)
        app.subsystem(p.nqn).allow_any_host = p.allow_any_host
        return True

    @m("nvmf_get_stats")
    async def nvmf_get_stats(app: TargetApp, params: object) -> object:
        p = decode_params(_TgtOnly, params, error=_invalid)
        _check_target(p.tgt_name)
        return app.stats()

    return methods


__all__ = [
    "BdevName",
    "SubsystemOptions",
    "TargetApp",
    "TransportOptions",
    "core_methods",
    "normalize_address",
]
