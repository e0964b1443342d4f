"""SPDK's core JSON-RPC methods, with SPDK's names, parameter shapes and error codes.

Each method decodes its parameters into a small attrs record (unknown parameters are refused, as
SPDK's ``spdk_json_decode_object`` does) and changes the ``TargetApp`` live.
"""

from __future__ import annotations

import errno
import logging
import uuid
from collections.abc import Callable

import attrs

from nvmeof.spec.fabrics import DISCOVERY_NQN
from nvmeof.target.app import (
    MAX_NQN_LENGTH,
    SubsystemOptions,
    TargetApp,
    TransportOptions,
    normalize_address,
)
from nvmeof.target.auth import HostAuthConfig
from nvmeof.target.bdev.base import BdevNotFound
from nvmeof.target.rpc import (
    BOTH_STATES,
    RpcError,
    RpcErrorCode,
    RpcMethods,
    RpcState,
    decode_params,
    no_params,
)
from nvmeof.target.subsystem import MAX_CNTLID, ListenAddress, Subsystem

log = logging.getLogger("nvmeof.target.rpc")

VERSION = (0, 1, 0, "")
TARGET_NAME = "nvmf_tgt"  # SPDK's default target; the only one a GPUCache process has
SPDK_DEFAULT_SERIAL = "00000000000000000000"


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


__all__ = ["BdevName", "core_methods"]
