"""The interface between the target's KV namespace and a key-value engine.

The namespace turns NVMe KV commands into calls on a ``KeyValueEngine`` and turns an ``EngineError``
into the completion status it carries (``kv_status``). Engines own the bytes: ``allocate`` hands out
the buffer the network data lands in, ``store`` takes ownership of it without a copy, ``retrieve``
returns a zero-copy view. Stored buffers are never mutated in place, so a view handed out earlier
keeps the old bytes even after an overwrite or eviction.

Operations that may touch a disk are coroutines (``store_async``, ``retrieve_async``,
``delete_async``, ``flush``): a flash engine runs its I/O in worker threads through an injected
``Offload`` (this package may not import an event loop library), while the DRAM engine answers
them at once from its synchronous methods. Index-only operations (``exists``, ``list_keys``,
``allocate``) stay synchronous: every engine keeps its index in memory.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, runtime_checkable

import attrs

from nvmeof.errors import NvmeofError


class EngineStatus(enum.IntEnum):
    """The generic (SCT 0) status codes an engine reports: Capacity Exceeded plus the KV range.

    The same wire values as ``kvext.spec.KvStatus``; kept here so engines depend on no wire module.
    """

    CAPACITY_EXCEEDED = 0x81
    INVALID_VALUE_SIZE = 0x85
    INVALID_KEY_SIZE = 0x86
    KEY_DOES_NOT_EXIST = 0x87
    UNRECOVERED_ERROR = 0x88
    KEY_EXISTS = 0x89


class EngineError(NvmeofError):
    """A KV operation failed; ``kv_status`` is the NVMe status code the namespace completes with."""

    kv_status: int = EngineStatus.CAPACITY_EXCEEDED


class ValueTooLarge(EngineError):
    """The value is longer than the engine's maximum value length."""

    kv_status = EngineStatus.INVALID_VALUE_SIZE


class InvalidKey(EngineError):
    """The key is empty or longer than the engine's maximum key length."""

    kv_status = EngineStatus.INVALID_KEY_SIZE


class CapacityExceeded(EngineError):
    """The value does not fit and the eviction policy cannot (or may not) make room."""

    kv_status = EngineStatus.CAPACITY_EXCEEDED


class KeyMissing(EngineError):
    """The key does not exist (retrieve, or store with ``must_exist``)."""

    kv_status = EngineStatus.KEY_DOES_NOT_EXIST


class Unrecovered(EngineError):
    """The stored record failed its check (CRC): dropped, never returned. Later reads miss."""

    kv_status = EngineStatus.UNRECOVERED_ERROR


class KeyPresent(EngineError):
    """The key exists and the store said ``must_not_exist``."""

    kv_status = EngineStatus.KEY_EXISTS


def flat_bytes(value: memoryview) -> memoryview:
    """A flat unsigned-byte view of the same memory (no copy)."""
    return value if value.format == "B" and value.ndim == 1 else value.cast("B")


def check_store(
    limits: EngineLimits,
    key: bytes,
    value: memoryview,
    *,
    present: bool,
    must_exist: bool,
    must_not_exist: bool,
) -> memoryview:
    """What every engine checks before a Store, in one order; returns the value as flat bytes.

    ``present`` says whether the engine holds ``key`` now (for the must-(not-)exist options).
    """
    if must_exist and must_not_exist:
        raise ValueError("must_exist and must_not_exist are mutually exclusive")
    if not 1 <= len(key) <= limits.max_key_length:
        raise InvalidKey(f"key of {len(key)} bytes is outside 1..{limits.max_key_length}")
    value = flat_bytes(value)
    if value.nbytes > limits.max_value_length:
        raise ValueTooLarge(
            f"value of {value.nbytes} bytes exceeds the maximum of {limits.max_value_length}"
        )
    if must_exist and not present:
        raise KeyMissing(f"key {key!r} does not exist")
    if must_not_exist and present:
        raise KeyPresent(f"key {key!r} exists")
    return value


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _key_length(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    # The KV command set carries at most 16 key bytes in the command (KVKML <= 16).
    if not 1 <= value <= 16:
        raise ValueError(f"{attribute.name} must be 1..16, got {value}")


@attrs.frozen(kw_only=True)
class EngineLimits:
    """What the namespace advertises in its KV format (KVKML, KVVML, MNKS) and the byte budget."""

    max_value_length: int = attrs.field(validator=_positive)
    capacity_bytes: int = attrs.field(validator=_positive)
    max_key_length: int = attrs.field(default=16, validator=_key_length)
    max_keys: int = attrs.field(default=0, validator=_non_negative)  # 0 = unbounded


@attrs.define
class EngineStats:
    """Running counters; ``evicted_bytes`` counts accounted bytes (key + value + entry overhead)."""

    stores: int = 0
    retrieves: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    bytes_in: int = 0  # value bytes accepted by Store
    bytes_out: int = 0  # value bytes returned by Retrieve


_T = TypeVar("_T")


class Offload(Protocol):
    """Runs a blocking function off the event loop (``anyio.to_thread.run_sync``, wrapped)."""

    def __call__(self, func: Callable[[], _T], /) -> Awaitable[_T]: ...


async def run_inline(func: Callable[[], _T], /) -> _T:
    """An ``Offload`` that blocks the caller: for tools and tests that run no event loop work."""
    return func()


@runtime_checkable
class KeyValueEngine(Protocol):
    """A key-value store the target's KV namespace serves from (DRAM now, flash later)."""

    @property
    def limits(self) -> EngineLimits: ...

    @property
    def stats(self) -> EngineStats: ...

    @property
    def used_bytes(self) -> int: ...

    def allocate(self, size: int) -> memoryview:
        """A writable buffer for an incoming ``size``-byte value; ``ValueTooLarge`` if too big."""
        ...

    async def store_async(
        self,
        key: bytes,
        value: memoryview,
        *,
        must_exist: bool = False,
        must_not_exist: bool = False,
    ) -> None:
        """Take ownership of ``value`` (no copy) under ``key``, evicting per policy to make room."""
        ...

    async def retrieve_async(self, key: bytes) -> memoryview:
        """A read-only view of the value; ``KeyMissing`` if absent. Counts as a use."""
        ...

    async def delete_async(self, key: bytes) -> bool:
        """Remove ``key``; True if it existed."""
        ...

    async def flush(self) -> None:
        """Make every acknowledged Store and Delete durable (a no-op for DRAM)."""
        ...

    def close(self) -> None:
        """Release the engine at shutdown (a flash engine checkpoints its index); blocking."""
        ...

    def describe(self) -> dict[str, object]:
        """Capacity, usage and counters as a JSON-able dict (for RPC and logs)."""
        ...

    def exists(self, key: bytes) -> bool: ...

    def list_keys(self, start: bytes = b"", limit: int | None = None) -> list[bytes]:
        """Keys in a stable (sorted) order from the first key >= ``start``, at most ``limit``."""
        ...

    def __len__(self) -> int: ...
