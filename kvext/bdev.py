"""KV bdevs: key-value engines as the target's bdevs, so SPDK's RPC and JSON config make KV
namespaces the way they make block ones (``nvmf_subsystem_add_ns`` names the bdev).

``KvMallocBdev`` is SPDK's ``bdev_kvmalloc`` (a DRAM KV store; its data goes with the process).
``KvFlashBdev`` is ours, ``bdev_kvflash``: the flash engine (``kvext.engine.flash``), whose data
survives a restart.
"""

from __future__ import annotations

import logging
import uuid as uuid_mod
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from kvext.engine.base import EngineLimits, KeyValueEngine
from kvext.engine.memory import MemoryEngine
from kvext.namespace import KeyValueNamespace

log = logging.getLogger("kvext.bdev")

DEFAULT_MAX_KEY_SIZE = 16  # SPDK's bdev_kvmalloc defaults
DEFAULT_MAX_VALUE_SIZE = 131072
DEFAULT_OPTIMAL_VALUE_GRANULARITY = 4096
DEFAULT_CAPACITY = 1 << 30  # ours: SPDK's kvmalloc has no size parameter
T = TypeVar("T")
_BLOCK = 4096  # KV namespaces report their capacity in 4 KiB units in the NVM-shaped CNS 0

_SUPPORTED_IO_TYPES = (
    "read", "write", "unmap", "flush", "reset", "nvme_admin", "nvme_io", "nvme_io_md",
    "write_zeroes", "zcopy", "get_zone_info", "zone_management", "zone_append", "compare",
    "compare_and_write", "abort", "seek_hole", "seek_data", "copy", "nvme_iov_md", "nvme_nssr",
    "write_uncorrectable",
)  # fmt: skip


def describe_kv_bdev(
    *,
    name: str,
    bdev_uuid: uuid_mod.UUID,
    product_name: str,
    engine: KeyValueEngine,
    claimed: bool,
    driver: str,
    driver_specific: dict[str, object],
) -> dict[str, object]:
    """A ``bdev_get_bdevs`` entry in SPDK's shape. A KV bdev moves no blocks: every block I/O
    type is false, and block size / count describe the capacity in 4 KiB units."""
    entry: dict[str, object] = {
        "name": name,
        "aliases": [str(bdev_uuid)],
        "product_name": product_name,
        "block_size": _BLOCK,
        "num_blocks": engine.limits.capacity_bytes // _BLOCK,
        "preferred_write_alignment": 0,
        "preferred_write_granularity": 0,
        "optimal_write_size": 0,
        "preferred_unmap_alignment": 0,
        "preferred_unmap_granularity": 0,
        "uuid": str(bdev_uuid),
        "numa_id": -1,
        "assigned_rate_limits": {
            "rw_ios_per_sec": 0,
            "rw_mbytes_per_sec": 0,
            "r_mbytes_per_sec": 0,
            "w_mbytes_per_sec": 0,
        },
        "claimed": claimed,
    }
    if claimed:
        entry["claim_type"] = "exclusive_write"
    entry["zoned"] = False
    entry["supported_io_types"] = dict.fromkeys(_SUPPORTED_IO_TYPES, False)
    entry["driver_specific"] = {
        driver: {
            **driver_specific,
            "max_key_size": engine.limits.max_key_length,
            "max_value_size": engine.limits.max_value_length,
            "capacity_bytes": engine.limits.capacity_bytes,
            "used_bytes": engine.used_bytes,
            "keys": len(engine),
        }
    }
    return entry


class _KvBdev:
    """What both KV bdevs share: a name, a UUID, an engine, and the namespace made from it."""

    product_name: str
    driver: str  # the driver_specific key of ``bdev_get_bdevs``
    name: str
    uuid: uuid_mod.UUID
    engine: KeyValueEngine
    claimed: bool

    def make_namespace(self) -> KeyValueNamespace:
        self.claimed = True
        return KeyValueNamespace(self.engine, name=self.name, ns_uuid=self.uuid)

    def driver_specific(self) -> dict[str, object]:
        return {}

    def describe(self) -> dict[str, object]:
        return describe_kv_bdev(
            name=self.name,
            bdev_uuid=self.uuid,
            product_name=self.product_name,
            engine=self.engine,
            claimed=self.claimed,
            driver=self.driver,
            driver_specific=self.driver_specific(),
        )


class KvMallocBdev(_KvBdev):
    """A DRAM key-value bdev (``bdev_kvmalloc_create``) over a ``MemoryEngine``."""

    product_name = "KV Malloc disk"
    driver = "kvmalloc"

    def __init__(
        self,
        name: str,
        *,
        uuid: uuid_mod.UUID | None = None,
        max_key_size: int = DEFAULT_MAX_KEY_SIZE,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        optimal_value_granularity: int = DEFAULT_OPTIMAL_VALUE_GRANULARITY,
        capacity_bytes: int = DEFAULT_CAPACITY,
        eviction: str = "lru",
    ) -> None:
        if not name:
            raise ValueError("a bdev needs a name")
        if optimal_value_granularity < 1:
            raise ValueError("optimal_value_granularity must be positive")
        self.name = name
        self.uuid = uuid or uuid_mod.uuid4()
        self.optimal_value_granularity = optimal_value_granularity
        self.eviction = eviction
        self.engine = MemoryEngine(
            EngineLimits(
                capacity_bytes=capacity_bytes,
                max_value_length=max_value_size,
                max_key_length=max_key_size,
            ),
            policy=eviction,
        )
        self.claimed = False
        log.info(
            "kvmalloc bdev %s: capacity %d bytes, keys up to %d bytes, values up to %d bytes",
            name, capacity_bytes, max_key_size, max_value_size,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<KvMallocBdev {self.name}>"

    def driver_specific(self) -> dict[str, object]:
        return {
            "optimal_value_granularity": self.optimal_value_granularity,
            "eviction": self.eviction,
        }

    def config_entry(self) -> dict[str, object]:
        limits = self.engine.limits
        return {
            "method": "bdev_kvmalloc_create",
            "params": {
                "name": self.name,
                "uuid": str(self.uuid),
                "max_key_size": limits.max_key_length,
                "max_value_size": limits.max_value_length,
                "optimal_value_granularity": self.optimal_value_granularity,
                "capacity_bytes": limits.capacity_bytes,
                "eviction": self.eviction,
            },
        }

    async def aclose(self) -> None:
        self.claimed = False
        self.engine.close()


class FlashEngineUnavailable(RuntimeError):
    pass


async def _to_thread(func: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(func)


class KvFlashBdev(_KvBdev):
    """A flash key-value bdev (``bdev_kvflash_create``): the flash engine on a file or block
    device, optionally behind a DRAM tier (``dram_size``)."""

    product_name = "KV Flash disk"
    driver = "kvflash"

    def __init__(
        self,
        name: str,
        filename: str,
        engine: KeyValueEngine,
        *,
        uuid: uuid_mod.UUID | None = None,
        dram_size: int = 0,
    ) -> None:
        self.name = name
        self.filename = filename
        self.engine = engine
        self.uuid = uuid or uuid_mod.uuid4()
        self.dram_size = dram_size
        self.claimed = False

    @classmethod
    async def open(
        cls,
        name: str,
        filename: str,
        *,
        uuid: uuid_mod.UUID | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        size: int | None = None,
        format: bool = False,
        dram_size: int = 0,
    ) -> KvFlashBdev:
        """Open (formatting a blank device; ``size`` creates or grows a file) and recover."""
        try:
            from kvext.engine.flash import FlashEngine, FlashOpenError
            from kvext.engine.tiered import TieredEngine
        except ImportError as exc:  # pragma: no cover - a build without the flash engine
            raise FlashEngineUnavailable("flash engine not available") from exc
        if not name:
            raise ValueError("a bdev needs a name")

        def open_flash() -> FlashEngine:
            return FlashEngine.open(
                filename,
                max_value_length=max_value_size,
                size=size,
                format=format,
                offload=_to_thread,
            )

        try:
            flash = await anyio.to_thread.run_sync(open_flash)
        except FlashOpenError as exc:
            raise ValueError(str(exc)) from exc
        engine: KeyValueEngine = flash
        if dram_size:
            limits = EngineLimits(capacity_bytes=dram_size, max_value_length=max_value_size)
            engine = TieredEngine(MemoryEngine(limits, policy="lru"), flash)
        log.info("kvflash bdev %s on %s (DRAM tier %d bytes)", name, filename, dram_size)
        return cls(name, filename, engine, uuid=uuid, dram_size=dram_size)

    def __repr__(self) -> str:
        return f"<KvFlashBdev {self.name} {self.filename}>"

    def driver_specific(self) -> dict[str, object]:
        return {"filename": self.filename, "dram_size": self.dram_size}

    def config_entry(self) -> dict[str, object]:
        limits = self.engine.limits
        return {
            "method": "bdev_kvflash_create",
            "params": {
                "name": self.name,
                "filename": self.filename,
                "uuid": str(self.uuid),
                "max_value_size": limits.max_value_length,
                "dram_size": self.dram_size,
            },
        }

    async def aclose(self) -> None:
        self.claimed = False
        await anyio.to_thread.run_sync(self.engine.close)
