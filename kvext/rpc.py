"""The KV bdevs' RPC methods, added to the target's registry (``register_kv_methods``):
``bdev_kvmalloc_create`` / ``bdev_kvmalloc_delete`` with the parameters of SPDK's KV series
(name, uuid, max_key_size, max_value_size, optimal_value_granularity, numa_id; ours besides:
capacity_bytes, eviction), and ours for the flash engine, ``bdev_kvflash_create`` /
``bdev_kvflash_delete``, named in the same style.

``bdev_kv_get_stats {name?}`` (ours) reports every KV namespace's counters per tier
(``kvext.stats``): the namespaces of every subsystem, the command line's default one included
(it is no bdev), then the KV bdevs that are in no subsystem; ``name`` picks one by namespace or
bdev name. ``gpucache stats`` prints it.
"""

from __future__ import annotations

import errno
import inspect
import json
import uuid
from typing import Any

import attrs

from kvext.bdev import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_KEY_SIZE,
    DEFAULT_MAX_VALUE_SIZE,
    DEFAULT_OPTIMAL_VALUE_GRANULARITY,
    FlashEngineUnavailable,
    KvFlashBdev,
    KvMallocBdev,
)
from kvext.namespace import KeyValueNamespace
from kvext.stats import namespace_stats
from nvmeof.target.app import TargetApp
from nvmeof.target.rpc import RpcError, RpcErrorCode, RpcMethods, decode_params
from nvmeof.target.rpc_methods import BdevName


@attrs.frozen
class KvMallocCreate:
    name: str | None = None
    uuid: str | None = None
    max_key_size: int = DEFAULT_MAX_KEY_SIZE
    max_value_size: int = DEFAULT_MAX_VALUE_SIZE
    optimal_value_granularity: int = DEFAULT_OPTIMAL_VALUE_GRANULARITY
    numa_id: int | None = None
    capacity_bytes: int = DEFAULT_CAPACITY
    eviction: str = "lru"


@attrs.frozen
class KvFlashCreate:
    name: str
    filename: str
    uuid: str | None = None
    max_value_size: int = DEFAULT_MAX_VALUE_SIZE
    size: int | None = None  # create (or grow) a regular file to this many bytes
    format: bool = False  # format a device that holds something else (destroys it)
    dram_size: int = 0  # a DRAM tier in front of the flash (0: none)


@attrs.frozen
class KvGetStats:
    name: str | None = None


def _decode_failed(detail: str) -> RpcError:
    return RpcError.decode_failed(detail)


def _uuid(value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise RpcError.decode_failed(f"{value!r} is not a UUID") from None


def _check_name(app: TargetApp, name: str) -> None:
    if name in {b.name for b in app.bdevs}:
        raise RpcError.errno(errno.EEXIST, f"bdev {name} exists")


async def bdev_kvmalloc_create(app: TargetApp, params: object) -> object:
    p = decode_params(KvMallocCreate, params, error=_decode_failed)
    name = p.name or app.unique_bdev_name("KvMalloc")
    _check_name(app, name)
    try:
        bdev = KvMallocBdev(
            name,
            uuid=_uuid(p.uuid),
            max_key_size=p.max_key_size,
            max_value_size=p.max_value_size,
            optimal_value_granularity=p.optimal_value_granularity,
            capacity_bytes=p.capacity_bytes,
            eviction=p.eviction,
        )
    except (ValueError, KeyError) as exc:
        raise RpcError.errno(errno.EINVAL, str(exc)) from exc
    return app.add_bdev(bdev)


async def bdev_kvmalloc_delete(app: TargetApp, params: object) -> object:
    p = decode_params(BdevName, params, error=_decode_failed)
    await app.delete_bdev(p.name, KvMallocBdev)
    return True


async def bdev_kvflash_create(app: TargetApp, params: object) -> object:
    p = decode_params(KvFlashCreate, params, error=_decode_failed)
    _check_name(app, p.name)
    try:
        bdev = await KvFlashBdev.open(
            p.name,
            p.filename,
            uuid=_uuid(p.uuid),
            max_value_size=p.max_value_size,
            size=p.size,
            format=p.format,
            dram_size=p.dram_size,
        )
    except FlashEngineUnavailable as exc:
        raise RpcError(RpcErrorCode.INTERNAL_ERROR, "flash engine not available", str(exc)) from exc
    except ValueError as exc:
        raise RpcError.errno(errno.EINVAL, str(exc)) from exc
    except OSError as exc:
        raise RpcError.errno(exc.errno or errno.EIO, f"{p.filename}: {exc}") from exc
    return app.add_bdev(bdev)


async def bdev_kvflash_delete(app: TargetApp, params: object) -> object:
    p = decode_params(BdevName, params, error=_decode_failed)
    await app.delete_bdev(p.name, KvFlashBdev)
    return True


async def bdev_kv_get_stats(app: TargetApp, params: object) -> object:
    p = decode_params(KvGetStats, params, error=_decode_failed)
    entries: list[dict[str, object]] = []
    for nqn, subsystem in app.target.subsystems.items():
        for nsid, namespace in sorted(subsystem.namespaces.items()):
            if not isinstance(namespace, KeyValueNamespace):
                continue
            bdev_name = app.namespace_bdevs.get((nqn, nsid))
            if p.name is not None and p.name not in (namespace.name, bdev_name):
                continue
            entries.append(
                namespace_stats(
                    namespace.engine, name=namespace.name, nqn=nqn, nsid=nsid, bdev_name=bdev_name
                )
            )
    for bdev in app.bdevs:
        if not isinstance(bdev, KvMallocBdev | KvFlashBdev) or app.claimed_by(bdev.name):
            continue
        if p.name is not None and p.name != bdev.name:
            continue
        entries.append(
            namespace_stats(bdev.engine, name=bdev.name, nqn=None, nsid=None, bdev_name=bdev.name)
        )
    if p.name is not None and not entries:
        raise RpcError.errno(errno.ENODEV, f"no KV namespace or bdev '{p.name}'")
    return entries


def register_kv_methods(methods: RpcMethods) -> RpcMethods:
    """Add the KV bdev methods to a registry (from ``nvmeof.target.rpc_methods.core_methods()``)."""
    for handler in (
        bdev_kvmalloc_create,
        bdev_kvmalloc_delete,
        bdev_kvflash_create,
        bdev_kvflash_delete,
        bdev_kv_get_stats,
    ):
        assert inspect.iscoroutinefunction(handler)
        methods.register(handler.__name__, handler)
    return methods


def spdk_rpc_plugin_initialize(subparsers: Any) -> None:
    """``spdk-rpc --plugin kvext.rpc bdev_kvflash_create ...``: SPDK's client has the kvmalloc
    commands already; this adds ours for the flash engine (SPDK's plugin hook, no SPDK import)."""

    def create(args: Any) -> None:
        params = {
            k: v
            for k, v in vars(args).items()
            if k in attrs.fields_dict(KvFlashCreate) and v not in (None, False)
        }
        print(args.client.call("bdev_kvflash_create", params))

    p = subparsers.add_parser("bdev_kvflash_create", help="Create a GPUCache flash KV bdev")
    p.add_argument("filename", help="file or block device holding the KV store")
    p.add_argument("-b", "--name", required=True, help="name of the bdev")
    p.add_argument("-u", "--uuid", help="UUID of the bdev (optional)")
    p.add_argument("-v", "--max-value-size", type=int, help="largest value, in bytes")
    p.add_argument("-s", "--size", type=int, help="create or grow the file to this many bytes")
    p.add_argument("--format", action="store_true", help="format a device holding other data")
    p.add_argument("-d", "--dram-size", type=int, help="DRAM tier in front, in bytes")
    p.set_defaults(func=create)

    def delete(args: Any) -> None:
        args.client.call("bdev_kvflash_delete", {"name": args.name})

    p = subparsers.add_parser("bdev_kvflash_delete", help="Delete a GPUCache flash KV bdev")
    p.add_argument("name", help="flash KV bdev name")
    p.set_defaults(func=delete)

    def get_stats(args: Any) -> None:
        params = {"name": args.name} if args.name else None
        print(json.dumps(args.client.call("bdev_kv_get_stats", params), indent=2))

    p = subparsers.add_parser(
        "bdev_kv_get_stats", help="Counters of the KV namespaces, per tier (DRAM, flash)"
    )
    p.add_argument("-b", "--name", help="one namespace or bdev (default: all)")
    p.set_defaults(func=get_stats)
