"""``KVClient``: put and get values and tensors by key on a KV namespace of a GPUCache target.

Every value goes on the wire behind a small header (``kvext.framing``) holding its kind, dtype,
shape and the caller's full key. So a tensor comes back as a tensor, and a long or ``str`` key,
which travels as its 16-byte BLAKE2b hash, is compared in full on read: a hash collision reads as
"not found", never as another key's value. ``get(key, out=buf)`` lands the value in ``buf`` itself.
``framing=False`` stores raw values (interop with other KV initiators, such as SPDK's).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio

from kvext.framing import FramingError, ValueHeader, ValueKind, pack_header
from kvext.keys import key_bytes, wire_key
from kvext.spec import (
    KV_CSI,
    KvStatus,
    StoreOption,
    decode_key_list,
    delete_command,
    exist_command,
    kv_status,
    list_command,
    retrieve_command,
    store_command,
)
from kvext.tensor import Value, describe, describe_out, materialize
from nvmeof.errors import KeyExists, KeyNotFound, NvmeError, NvmeofError
from nvmeof.initiator.controller import Controller
from nvmeof.spec.completion import Completion
from nvmeof.spec.status import StatusCodeType

log = logging.getLogger("kvext.client")

Key = bytes | str

_MUST_EXIST = int(StoreOption.MUST_EXIST)
_MUST_NOT_EXIST = int(StoreOption.MUST_NOT_EXIST)
_FIRST_READ = 64 * 1024  # a get() without out= reads this much first, then the rest if needed
_LIST_ENTRY_MAX = 20  # u16 length + 16-byte key, padded to 4 bytes


def _kv_code(completion: Completion) -> int | None:
    status = completion.status
    return status.sc if status.sct == StatusCodeType.GENERIC else None


async def gather_gets(
    get: Callable[..., Awaitable[Value]],
    keys: Sequence[Any],
    outs: Sequence[object] | None = None,
) -> list[Value]:
    """``get`` every key at once (into the matching ``outs`` when given), results in key order.

    The batch form of both ``KVClient`` and ``ec.cluster.ClusterKV``.
    """
    if outs is not None and len(outs) != len(keys):
        raise ValueError("keys and outs differ in length")
    results: list[Value] = [None] * len(keys)

    async def one(i: int) -> None:
        results[i] = await get(keys[i], out=None if outs is None else outs[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(keys)):
            tg.start_soon(one, i)
    return results


class KVClient:
    """Key-value operations on one KV namespace of a connected controller."""

    def __init__(
        self,
        controller: Controller,
        nsid: int | None = None,
        *,
        framing: bool = True,
        timeout: float | None = 30.0,
        tenant: str | bytes | None = None,
    ) -> None:
        """``tenant`` (LMCache's cache_salt): part of every key's identity (``kvext.keys``)."""
        if nsid is None:
            kv = [n for n, info in sorted(controller.namespaces.items()) if info.csi == KV_CSI]
            if not kv:
                raise NvmeofError(f"{controller.options.subnqn} has no key-value namespace")
            nsid = kv[0]
        self.controller = controller
        self.nsid = nsid
        self.framing = framing
        self.timeout = timeout
        self.tenant = tenant
        if tenant is not None:
            wire_key(b"k", tenant)  # validate now, not on the first put

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        address: str | tuple[str, int],
        subnqn: str,
        *,
        nsid: int | None = None,
        framing: bool = True,
        tenant: str | bytes | None = None,
        **options: Any,
    ) -> AsyncIterator[KVClient]:
        """Connect a controller (keep alive running) and give a client on its KV namespace."""
        async with Controller.connect(address, subnqn, **options) as controller:
            yield cls(controller, nsid, framing=framing, tenant=tenant)

    # --- single operations ------------------------------------------------------------------
    async def put(
        self,
        key: Key,
        value: object,
        *,
        must_exist: bool = False,
        must_not_exist: bool = False,
    ) -> None:
        """Store ``value`` (bytes-like, numpy array or torch CPU tensor) under ``key``."""
        layout, payload = describe(value)
        if self.framing:
            header = pack_header(layout, key_bytes(key, self.tenant), len(payload))
            out: list[bytes | memoryview] = [header, payload]
        else:
            out = [payload]
        size = sum(map(len, out))
        options = 0
        if must_exist or must_not_exist:
            options = (_MUST_EXIST if must_exist else 0) | (
                _MUST_NOT_EXIST if must_not_exist else 0
            )
        completion = await self.controller.execute_io(
            store_command(self.nsid, wire_key(key, self.tenant), size, options=options),
            out=out,
            timeout=self.timeout,
            check=False,
        )
        self._check(completion, key, "put")

    async def get(self, key: Key, *, out: object = None) -> Value:
        """The value stored under ``key``; with ``out``, it lands in ``out`` and ``out`` returns.

        Raises ``KeyNotFound`` if there is no such key.
        """
        if out is not None:
            return await self._get_into(key, out)
        whole = await self._retrieve_whole(key)
        if not self.framing:
            return bytes(whole)
        header = self._parse(key, whole)
        payload = whole[header.length : header.length + header.payload_len]
        if header.kind is ValueKind.BYTES:
            return bytes(payload)
        return materialize(header, payload)

    async def _get_into(self, key: Key, out: object) -> object:
        layout, dest = describe_out(out)
        if not self.framing:
            completion = await self._retrieve(key, [dest])
            if completion.dw0 != len(dest):
                raise ValueError(f"value of {key!r} is {completion.dw0} bytes, out is {len(dest)}")
            return out
        # The header this value has if it was put as ``out`` is now (the usual case): then
        # comparing bytes checks all of it, the full key (hash collisions) included.
        expected = pack_header(layout, key_bytes(key, self.tenant), len(dest))
        scratch = bytearray(len(expected))
        completion = await self._retrieve(key, [memoryview(scratch), dest])
        if completion.dw0 == len(scratch) + len(dest):
            if scratch == expected:
                return out
            header = self._parse(key, scratch)
            if header.length == len(scratch) and header.payload_len == len(dest):
                return out
        # The stored value is framed differently (other shape or size): read it whole, then copy.
        whole = await self._retrieve_whole(key)
        header = self._parse(key, whole)
        if header.payload_len != len(dest):
            raise ValueError(
                f"value of {key!r} is {header.payload_len} bytes"
                f" ({header.dtype}{list(header.shape)}), out has {len(dest)}"
            )
        dest[:] = whole[header.length : header.length + header.payload_len]
        return out

    def _parse(self, key: Key, buf: bytes | bytearray | memoryview) -> ValueHeader:
        try:
            header = ValueHeader.unpack(buf)
        except FramingError as exc:
            raise NvmeofError(f"value of {key!r} is not a GPUCache-framed value: {exc}") from exc
        if header.key != key_bytes(key, self.tenant):
            # Another key with the same 16-byte hash: that value is not ours.
            raise KeyNotFound(kv_status(KvStatus.KEY_DOES_NOT_EXIST), f"{key!r} (hash collision)")
        return header

    async def _retrieve(self, key: Key, into: Sequence[memoryview]) -> Completion:
        size = sum(len(v) for v in into)
        completion = await self.controller.execute_io(
            retrieve_command(self.nsid, wire_key(key, self.tenant), size),
            into=into,
            timeout=self.timeout,
            check=False,
        )
        self._check(completion, key, "get")
        return completion

    async def _retrieve_whole(self, key: Key) -> memoryview:
        size = _FIRST_READ
        for _ in range(4):
            buf = bytearray(size)
            completion = await self._retrieve(key, [memoryview(buf)])
            if completion.dw0 <= size:
                return memoryview(buf)[: completion.dw0]
            size = completion.dw0  # the value is larger: read it again, whole
        raise NvmeofError(f"value of {key!r} kept changing size while being read")

    async def exists(self, key: Key) -> bool:
        completion = await self.controller.execute_io(
            exist_command(self.nsid, wire_key(key, self.tenant)), timeout=self.timeout, check=False
        )
        if _kv_code(completion) == KvStatus.KEY_DOES_NOT_EXIST:
            return False
        self._check(completion, key, "exists")
        return True

    async def delete(self, key: Key) -> None:
        """Delete ``key``; deleting an absent key succeeds (the KV default, EDNEK = 0)."""
        completion = await self.controller.execute_io(
            delete_command(self.nsid, wire_key(key, self.tenant)), timeout=self.timeout, check=False
        )
        self._check(completion, key, "delete")

    async def list(self, start: Key | None = None, *, max_keys: int = 1024) -> list[bytes]:
        """Up to ``max_keys`` wire keys (hashed keys come back as their hashes) from ``start``."""
        size = 4 + max_keys * _LIST_ENTRY_MAX
        buf = bytearray(size)
        start_key = wire_key(start, self.tenant) if start is not None else b""
        completion = await self.controller.execute_io(
            list_command(self.nsid, size, start_key=start_key),
            into=[memoryview(buf)],
            timeout=self.timeout,
            check=False,
        )
        self._check(completion, start, "list")
        return decode_key_list(buf)

    # --- batches ----------------------------------------------------------------------------
    async def put_many(self, items: Iterable[tuple[Key, object]]) -> None:
        """Store many values at once, spread over every I/O queue."""
        async with anyio.create_task_group() as tg:
            for key, value in items:
                tg.start_soon(self.put, key, value)

    async def get_many(
        self, keys: Sequence[Key], *, outs: Sequence[object] | None = None
    ) -> builtins.list[Value]:
        """Fetch many values at once (into ``outs`` when given), spread over every I/O queue."""
        return await gather_gets(self.get, keys, outs)

    # --- errors -----------------------------------------------------------------------------
    @staticmethod
    def _check(completion: Completion, key: Key | None, what: str) -> None:
        status = completion.status
        if status.success:
            return
        code = _kv_code(completion)
        if code == KvStatus.KEY_DOES_NOT_EXIST:
            raise KeyNotFound(status, f"{what} {key!r}")
        if code == KvStatus.KEY_EXISTS:
            raise KeyExists(status, f"{what} {key!r}")
        raise NvmeError(status, f"{what} {key!r}")
