"""One KV namespace over several worker processes: keys sharded by hash, commands forwarded.

Worker ``owner(key)`` (CRC-32 of the wire key, mod the worker count) holds a key; each worker's
engine holds only its own keys (and a 1/N share of the capacity). A worker that receives a KV
command for a key it does not own forwards it to the owner over a private channel: every worker
also serves a plain ``KeyValueNamespace`` on the *same* engine, on a Unix socket of its own, and
the others reach it through the ordinary initiator stack (raw commands by wire key). The private
namespace never forwards, so nothing loops.

- Store: the data is pulled here first, then sent to the owner as a Store with the same options;
- Retrieve, Exist, Delete: forwarded; the owner's status and DW0 come back unchanged;
- List: this worker's keys and every other worker's (same start key, same buffer) merged in key
  order; Flush: every worker flushes.

Initiators that know about the sharding avoid forwarding: the KV Identify Namespace page carries a
vendor-specific ``ShardMap`` at byte 3072 (the worker count, the answering worker's index, the hash
and every worker's own TCP port), and ``RoutedKVClient`` opens one controller per worker and sends
each key to its owner. See docs/workers.md.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import heapq
import logging
import struct
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import anyio
import attrs

from kvext.client import Key, KVClient, gather_gets
from kvext.engine.base import KeyValueEngine
from kvext.keys import wire_key
from kvext.namespace import KeyValueNamespace
from kvext.spec import (
    KV_CSI,
    MAX_KEY_LENGTH,
    KvCommandFields,
    KvOpcode,
    KvStatus,
    decode_key_list,
    delete_command,
    encode_key_list,
    exist_command,
    kv_status,
    list_command,
    retrieve_command,
    store_command,
)
from kvext.tensor import Value
from nvmeof.errors import CommandError
from nvmeof.initiator.controller import Controller, parse_address
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.identify import Cns, identify_command
from nvmeof.spec.status import GenericStatus, Status, StatusCodeType
from nvmeof.target.namespace import CommandResult
from nvmeof.transport.base import Buffer, ControllerChannel, Request
from nvmeof.transport.unix import open_unix

log = logging.getLogger("kvext.sharding")

SHARD_MAP_OFFSET = 3072  # the vendor-specific bytes of the KV Identify Namespace page
SHARD_MAP_MAGIC = b"GPUCshrd"
HASH_CRC32 = 1  # zlib.crc32(wire key) % workers
_KEY_DWORDS = struct.Struct("<4I")  # key bytes 0-15 in CDW2, CDW3, CDW14, CDW15 (kvext.spec)
MAX_WORKERS = 256
_HEAD = struct.Struct("<8sHHHH")  # magic, version, workers, index, hash
_PORT = struct.Struct("<H")
_ENTRY_MIN = 4
_FORWARDED = (KvOpcode.STORE, KvOpcode.RETRIEVE, KvOpcode.EXIST, KvOpcode.DELETE)


def owner(key: bytes, workers: int) -> int:
    """The worker that holds the wire key ``key``."""
    return zlib.crc32(key) % workers


@attrs.frozen
class ShardMap:
    """How a KV namespace is split across worker processes (as Identify reports it)."""

    workers: int
    index: int  # the worker that answered the Identify
    ports: tuple[int, ...]  # each worker's own TCP port (same host as the one asked)
    hash: int = HASH_CRC32

    def pack_into(self, page: bytearray) -> None:
        _HEAD.pack_into(
            page, SHARD_MAP_OFFSET, SHARD_MAP_MAGIC, 1, self.workers, self.index, self.hash
        )
        for i, port in enumerate(self.ports):
            _PORT.pack_into(page, SHARD_MAP_OFFSET + _HEAD.size + 2 * i, port)

    @classmethod
    def unpack(cls, page: Buffer) -> ShardMap | None:
        """The map in an Identify page; None if the target is not sharded (or says nothing)."""
        data = bytes(page)
        if len(data) < SHARD_MAP_OFFSET + _HEAD.size:
            return None
        magic, version, workers, index, hash_id = _HEAD.unpack_from(data, SHARD_MAP_OFFSET)
        if magic != SHARD_MAP_MAGIC or version != 1 or not 1 <= workers <= MAX_WORKERS:
            return None
        if index >= workers or hash_id != HASH_CRC32:
            return None
        base = SHARD_MAP_OFFSET + _HEAD.size
        ports = tuple(_PORT.unpack_from(data, base + 2 * i)[0] for i in range(workers))
        return cls(workers, index, ports, hash_id)


def _command_error(completion: Completion, what: str) -> CommandError:
    return CommandError(completion.status, f"{what} (forwarded)", dw0=completion.dw0)


class PeerLinks:
    """Controllers to every other worker's private namespace (``None`` for this worker).

    Made before the links exist (the namespace needs it from the start); forwarding waits until
    ``connected`` has linked every peer.
    """

    def __init__(self, index: int, count: int, *, nsid: int = 1) -> None:
        self.index = index
        self.count = count
        self.nsid = nsid
        self.controllers: list[Controller | None] = [None] * count
        self._ready = anyio.Event()

    @contextlib.asynccontextmanager
    async def connected(
        self,
        paths: Sequence[str],
        subnqn: str,
        *,
        io_queues: int = 4,
        queue_depth: int = 128,
        timeout: float = 60.0,
    ) -> AsyncIterator[PeerLinks]:
        """Link every other worker's Unix socket ``paths[peer]`` for the duration."""
        stack = contextlib.AsyncExitStack()
        try:
            for peer, path in enumerate(paths):
                if peer == self.index:
                    continue
                connector = functools.partial(_unix_connector, path)
                self.controllers[peer] = await stack.enter_async_context(
                    Controller.connect(
                        ("127.0.0.1", 0),
                        subnqn,
                        io_queues=io_queues,
                        queue_depth=queue_depth,
                        timeout=timeout,
                        connector=connector,
                    )
                )
            self._ready.set()
            yield self
        finally:
            # The peers may be stopping too: do not wait long for their shutdown handshakes.
            with anyio.move_on_after(2, shield=True):
                await stack.aclose()

    async def controller(self, peer: int) -> Controller:
        await self._ready.wait()
        found = self.controllers[peer]
        assert found is not None, "no link to this worker itself"
        return found

    async def execute(
        self,
        peer: int,
        command: Command,
        *,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
    ) -> Completion:
        ctrl = await self.controller(peer)
        return await ctrl.execute_io(command, out=out, into=into, check=False)


async def _unix_connector(path: str, host: str, port: int) -> Any:
    return await open_unix(path)


class ShardedNamespace(KeyValueNamespace):
    """A worker's face of the sharded namespace: its own keys here, the others' forwarded."""

    def __init__(
        self,
        engine: KeyValueEngine,
        shard_map: ShardMap,
        peers: PeerLinks,
        *,
        name: str = "kv0",
        **options: Any,
    ) -> None:
        super().__init__(engine, name=name, **options)
        self.shard_map = shard_map
        self.peers = peers
        self.forwarded = 0

    def identify_csi_namespace(self) -> bytes:
        page = bytearray(super().identify_csi_namespace())
        self.shard_map.pack_into(page)
        return bytes(page)

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out["worker"] = self.shard_map.index
        out["workers"] = self.shard_map.workers
        out["forwarded"] = self.forwarded
        return out

    def execute_now(self, request: Request) -> CommandResult | None:
        """The synchronous fast path, for this worker's own keys only: a foreign key, a List
        and a Flush need the other workers (``execute``)."""
        cmd = request.command
        opcode = cmd.opcode
        if opcode in _FORWARDED:
            # The owner straight from the SQE's key dwords (every command pays this check, so
            # no KvCommandFields here: 0.2 us instead of 1.2 us of a ~25 us command).
            key_length = cmd.cdw11 & 0xFF
            if 0 < key_length <= MAX_KEY_LENGTH:
                key = _KEY_DWORDS.pack(cmd.cdw2, cmd.cdw3, cmd.cdw14, cmd.cdw15)[:key_length]
                if owner(key, self.shard_map.workers) != self.shard_map.index:
                    return None
        elif opcode in (KvOpcode.LIST, KvOpcode.FLUSH):
            return None
        return super().execute_now(request)

    async def execute(self, request: Request, channel: ControllerChannel) -> CommandResult:
        cmd = request.command
        opcode = cmd.opcode
        shard = self.shard_map
        if opcode in _FORWARDED:
            fields = KvCommandFields.from_command(cmd)
            key = self._key(fields)
            peer = owner(key, shard.workers)
            if peer != shard.index:
                self.forwarded += 1
                return await self._forward(peer, request, channel, fields, key)
        elif opcode == KvOpcode.LIST:
            return await self._list(KvCommandFields.from_command(cmd))
        elif opcode == KvOpcode.FLUSH:
            await self._on_every_peer(self._flush_peer)
        return await super().execute(request, channel)

    async def _forward(
        self,
        peer: int,
        request: Request,
        channel: ControllerChannel,
        fields: KvCommandFields,
        key: bytes,
    ) -> CommandResult:
        nsid = self.peers.nsid
        opcode = request.command.opcode
        if opcode == KvOpcode.STORE:
            size = fields.size
            if size > self.engine.limits.max_value_length:
                raise CommandError(
                    kv_status(KvStatus.INVALID_VALUE_SIZE), KvStatus.INVALID_VALUE_SIZE.name
                )
            if request.command.dptr.length < size:
                raise CommandError(
                    Status.generic(GenericStatus.DATA_SGL_LENGTH_INVALID),
                    f"SGL length {request.command.dptr.length} < value size {size}",
                )
            value: memoryview
            if request.in_capsule is not None and len(request.in_capsule) == size:
                value = request.in_capsule
            else:
                value = memoryview(bytearray(size))
                if size:
                    await channel.pull(request, value)
            command = store_command(nsid, key, size, options=fields.options & 0x7)
            completion = await self.peers.execute(peer, command, out=[value] if size else ())
            if not completion.status.success:
                raise _command_error(completion, "store")
            return CommandResult()
        if opcode == KvOpcode.RETRIEVE:
            buf = bytearray(fields.size)
            into = [memoryview(buf)] if fields.size else []
            completion = await self.peers.execute(
                peer, retrieve_command(nsid, key, fields.size), into=into
            )
            if not completion.status.success:
                raise _command_error(completion, "retrieve")
            length = min(fields.size, completion.dw0)
            return CommandResult(
                dw0=completion.dw0, data=[memoryview(buf)[:length]] if length else ()
            )
        if opcode == KvOpcode.EXIST:
            completion = await self.peers.execute(peer, exist_command(nsid, key))
            if not completion.status.success:
                raise _command_error(completion, "exist")
            return CommandResult()
        # DELETE: the owner's private namespace reports a missing key (EDNEK set there);
        # this namespace's own EDNEK setting decides what the host sees.
        completion = await self.peers.execute(peer, delete_command(nsid, key))
        if not completion.status.success:
            missing = (
                completion.status.sct == StatusCodeType.GENERIC
                and completion.status.sc == KvStatus.KEY_DOES_NOT_EXIST
            )
            if not missing or self.error_on_delete_of_missing_key:
                raise _command_error(completion, "delete")
        return CommandResult()

    async def _list(self, fields: KvCommandFields) -> CommandResult:
        start = self._key(fields, allow_empty=True)
        size = fields.size
        limit = max(0, (size - 4) // _ENTRY_MIN)
        lists: list[list[bytes]] = [self.engine.list_keys(start, limit)]

        async def gather(peer: int) -> None:
            buf = bytearray(size)
            completion = await self.peers.execute(
                peer,
                list_command(self.peers.nsid, size, start_key=start),
                into=[memoryview(buf)] if size else [],
            )
            if not completion.status.success:
                raise _command_error(completion, "list")
            lists.append(decode_key_list(buf) if size >= 4 else [])

        await self._on_every_peer(gather)
        keys = _merge(lists, limit)
        return CommandResult(data=[encode_key_list(keys, size)])

    async def _flush_peer(self, peer: int) -> None:
        command = Command(opcode=KvOpcode.FLUSH, nsid=self.peers.nsid)
        completion = await self.peers.execute(peer, command)
        if not completion.status.success:
            raise _command_error(completion, "flush")

    async def _on_every_peer(self, action: Any) -> None:
        async with anyio.create_task_group() as tg:
            for peer in range(self.shard_map.workers):
                if peer != self.shard_map.index:
                    tg.start_soon(action, peer)


def _merge(lists: Iterable[list[bytes]], limit: int) -> list[bytes]:
    """Sorted, without duplicates, at most ``limit`` (each list is sorted already)."""
    out: list[bytes] = []
    for key in heapq.merge(*lists):
        if out and out[-1] == key:
            continue
        if len(out) >= limit:
            break
        out.append(key)
    return out


# --- the initiator side -------------------------------------------------------------------------
async def read_shard_map(controller: Controller, nsid: int) -> ShardMap | None:
    """The ``ShardMap`` of KV namespace ``nsid``; None if the target is not sharded."""
    page = bytearray(4096)
    await controller.admin.execute(
        identify_command(Cns.CSI_NAMESPACE, nsid=nsid, csi=KV_CSI), into=[memoryview(page)]
    )
    return ShardMap.unpack(page)


class RoutedKVClient:
    """``KVClient``'s operations, each sent to the worker that owns its key (no forwarding).

    Against a target with one worker (or any other KV target) it is one plain ``KVClient``.
    """

    def __init__(self, clients: Sequence[KVClient], shard_map: ShardMap | None) -> None:
        self.clients = list(clients)
        self.shard_map = shard_map

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        address: str | tuple[str, int],
        subnqn: str,
        *,
        nsid: int | None = None,
        framing: bool = True,
        **options: Any,
    ) -> AsyncIterator[RoutedKVClient]:
        """Connect through ``address``, read the shard map, connect each other worker's port."""
        host, _ = parse_address(address)
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(Controller.connect(address, subnqn, **options))
            kv = KVClient(first, nsid, framing=framing)
            shard_map = await read_shard_map(first, kv.nsid)
            if shard_map is None or shard_map.workers == 1:
                yield cls([kv], None)
                return
            clients: list[KVClient | None] = [None] * shard_map.workers
            clients[shard_map.index] = kv
            for w, port in enumerate(shard_map.ports):
                if clients[w] is None:
                    ctrl = await stack.enter_async_context(
                        Controller.connect((host, port), subnqn, **options)
                    )
                    clients[w] = KVClient(ctrl, kv.nsid, framing=framing)
            yield cls([c for c in clients if c is not None], shard_map)

    @property
    def timeout(self) -> float | None:
        return self.clients[0].timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        for client in self.clients:
            client.timeout = value

    def client_for(self, key: Key) -> KVClient:
        if self.shard_map is None:
            return self.clients[0]
        return self.clients[owner(wire_key(key), self.shard_map.workers)]

    async def put(
        self, key: Key, value: object, *, must_exist: bool = False, must_not_exist: bool = False
    ) -> None:
        await self.client_for(key).put(
            key, value, must_exist=must_exist, must_not_exist=must_not_exist
        )

    async def get(self, key: Key, *, out: object = None) -> Value:
        return await self.client_for(key).get(key, out=out)

    async def exists(self, key: Key) -> bool:
        return await self.client_for(key).exists(key)

    async def delete(self, key: Key) -> None:
        await self.client_for(key).delete(key)

    async def list(self, start: Key | None = None, *, max_keys: int = 1024) -> builtins.list[bytes]:
        """Any worker merges every worker's keys."""
        return await self.clients[0].list(start, max_keys=max_keys)

    async def put_many(self, items: Iterable[tuple[Key, object]]) -> None:
        async with anyio.create_task_group() as tg:
            for key, value in items:
                tg.start_soon(self.put, key, value)

    async def get_many(
        self, keys: Sequence[Key], *, outs: Sequence[object] | None = None
    ) -> builtins.list[Value]:
        return await gather_gets(self.get, keys, outs)
