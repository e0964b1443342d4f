"""The LMCache-agnostic core of both connectors: chunks by string key on a GPUCache target.

``ChunkStore`` owns one controller connection (made on first use, made again after the target
went away), and reads and writes whole chunks by their LMCache key string:

- a chunk goes on the wire as one Store of the caller's buffer (no copy), behind KVClient's value
  header, which carries the full key string; the wire key is the string's 16-byte BLAKE2b hash, and
  a read whose header holds another key (a hash collision) reads as a miss;
- ``get_into`` reads a chunk straight into the caller's buffer in one Retrieve: the header lands in
  a small scratch buffer and the payload in ``dest``; a shorter value (LMCache's partial last
  chunk) fills a prefix of ``dest`` and its length comes back;
- ``prefix_hits`` answers "how many leading chunks of this prefix are stored" with one round of
  pipelined Exist commands (all in flight at once, over every I/O queue).

``Prefetcher`` adds KV-aware prefetch on top: it learns prefix chains from the key lists LMCache
hands the connector (lookups, batched gets) and, when chunk i is fetched, fetches chunks
i+1..i+W of the same chain into host buffers, so the next get is a memcpy, not a round trip.

Everything here runs on one asyncio event loop (LMCache's, or the connector's own thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Container, Sequence
from itertools import pairwise
from typing import TypeVar

import anyio
import attrs

from kvext.client import KVClient
from kvext.framing import FramingError, ValueHeader, header_length
from kvext.keys import key_bytes, wire_key
from kvext.lmcache.url import TargetURL
from kvext.spec import KvStatus, retrieve_command
from nvmeof.errors import ConnectionLost, NvmeError
from nvmeof.initiator.controller import Controller
from nvmeof.spec.status import StatusCodeType
from nvmeof.transport.base import HostConnector
from nvmeof.transport.sockets import open_tcp

log = logging.getLogger("kvext.lmcache")

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


def byte_view(buf: object) -> memoryview:
    """A flat unsigned-byte view of ``buf`` (ctypes arrays give format '<B', which is the same)."""
    view = memoryview(buf)  # type: ignore[arg-type]
    if view.format in ("B", "<B", "=B") and view.ndim == 1:
        return view if view.format == "B" else view.cast("c").cast("B")
    return view.cast("B")


def chunk_key(namespace: str, salt: str, key: str) -> str:
    """The string a chunk is stored under: ``gpucache-lmcache/<namespace>/<salt>/<key>``.

    ``namespace`` keeps the two LMCache modes' key spaces apart; ``salt`` keeps tenants apart.
    """
    if "/" in salt:
        raise ValueError(f"a salt must not contain '/': {salt!r}")
    return f"gpucache-lmcache/{namespace}/{salt}/{key}"


class ChunkStore:
    """Chunks by key string on one GPUCache target, over one (re)connecting controller."""

    def __init__(self, url: TargetURL, *, connector: HostConnector = open_tcp) -> None:
        self.url = url
        self.connector = connector
        self._client: KVClient | None = None
        self._connecting: asyncio.Lock | None = None
        self.reconnects = 0

    # --- connection ---------------------------------------------------------------------------
    async def client(self) -> KVClient:
        if self._client is not None:
            return self._client
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is None:
                url = self.url
                controller = await Controller.connect(
                    url.address,
                    url.subnqn,
                    io_queues=url.queues,
                    queue_depth=url.depth,
                    timeout=url.timeout,
                    header_digest=url.digest,
                    data_digest=url.digest,
                    connector=self._connector(),
                )
                self._client = KVClient(controller, url.nsid, timeout=url.timeout)
                log.info("connected to %s", url)
        return self._client

    def _connector(self) -> HostConnector:
        if self.url.poll_us is None or self.connector is not open_tcp:
            return self.connector
        return functools.partial(open_tcp, poll=self.url.poll_us / 1e6)

    async def _drop(self, client: KVClient) -> None:
        if self._client is client:
            self._client = None
            self.reconnects += 1
            with anyio.CancelScope(shield=True):
                await client.controller.close(shutdown=False)

    async def _retry(self, op: Callable[[KVClient], Awaitable[T]]) -> T:
        """Run ``op``; if the connection was lost, connect again and run it once more."""
        client = await self.client()
        try:
            return await op(client)
        except (ConnectionLost, OSError) as exc:
            log.warning("lost %s (%s); reconnecting", self.url, exc)
            await self._drop(client)
        return await op(await self.client())

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.controller.close()

    # --- chunks -------------------------------------------------------------------------------
    async def put(self, key: str, payload: Buffer) -> None:
        async def op(kv: KVClient) -> None:
            await kv.put(key, payload)

        await self._retry(op)

    async def get_into(self, key: str, dest: memoryview) -> int | None:
        """Read ``key``'s value into ``dest[:n]`` and give ``n``; ``None`` if it is not stored.

        One Retrieve: the header goes to a scratch buffer, the payload straight into ``dest``.
        """

        async def op(kv: KVClient) -> int | None:
            return await read_into(kv, key, dest)

        return await self._retry(op)

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Exist for every key, all in flight at once."""
        found = [False] * len(keys)

        async def op(kv: KVClient) -> list[bool]:
            async def one(i: int) -> None:
                found[i] = await kv.exists(keys[i])

            async with anyio.create_task_group() as tg:
                for i in range(len(keys)):
                    tg.start_soon(one, i)
            return found

        return await self._retry(op)

    async def prefix_hits(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` are stored: one round of pipelined Exist commands."""
        found = await self.exists_many(keys)
        return found.index(False) if False in found else len(found)

    async def delete(self, key: str) -> None:
        async def op(kv: KVClient) -> None:
            await kv.delete(key)

        await self._retry(op)

    async def list(self, max_keys: int = 1024) -> list[bytes]:
        async def op(kv: KVClient) -> list[bytes]:
            return await kv.list(max_keys=max_keys)

        return await self._retry(op)


async def read_into(kv: KVClient, key: str, dest: memoryview) -> int | None:
    """One Retrieve of ``key`` into [scratch header, ``dest``]; the payload length, or None."""
    full = key_bytes(key)
    scratch = bytearray(header_length(len(full), 0))
    completion = await kv.controller.execute_io(
        retrieve_command(kv.nsid, wire_key(key), len(scratch) + len(dest)),
        into=[memoryview(scratch), dest],
        timeout=kv.timeout,
        check=False,
    )
    status = completion.status
    if not status.success:
        if status.sct == StatusCodeType.GENERIC and status.sc == KvStatus.KEY_DOES_NOT_EXIST:
            return None
        raise NvmeError(status, f"get {key!r}")
    if completion.dw0 < len(scratch):
        log.warning("%r: value of %d bytes is too short for its header", key, completion.dw0)
        return None
    try:
        header = ValueHeader.unpack(scratch)
    except FramingError as exc:
        log.warning("%r: not a GPUCache chunk (%s)", key, exc)
        return None
    if header.key != full:
        return None  # another key with the same 16-byte hash
    if header.length != len(scratch) or header.payload_len > len(dest):
        log.warning(
            "%r: stored chunk (%d bytes, %d-d) does not fit a %d-byte buffer",
            key,
            header.payload_len,
            len(header.shape),
            len(dest),
        )
        return None
    return header.payload_len


@attrs.define
class PrefetchStats:
    issued: int = 0
    hits: int = 0
    misses: int = 0
    wasted: int = 0  # prefetched, then dropped unused


class Prefetcher:
    """KV-aware prefetch: fetching chunk i of a prefix chain fetches chunks i+1..i+window ahead.

    Chains are learned from ordered key lists (``learn``); a prefetched chunk waits in a host
    buffer (at most ``capacity`` of them, oldest dropped first) until a ``get_into`` takes it.
    """

    def __init__(
        self,
        store: ChunkStore,
        window: int,
        *,
        capacity: int = 64,
        chain_capacity: int = 1 << 16,
    ) -> None:
        self.store = store
        self.window = window
        self.capacity = max(capacity, window)
        self.chain_capacity = chain_capacity
        self.stats = PrefetchStats()
        self._next: OrderedDict[str, str] = OrderedDict()
        self._ahead: OrderedDict[str, asyncio.Task[tuple[bytearray, int] | None]] = OrderedDict()

    def learn(self, keys: Sequence[str]) -> None:
        """Record that ``keys`` follow one another in a prefix chain."""
        if self.window <= 0:
            return
        for a, b in pairwise(keys):
            self._next[a] = b
            self._next.move_to_end(a)
        while len(self._next) > self.chain_capacity:
            self._next.popitem(last=False)

    def following(self, key: str, count: int | None = None) -> list[str]:
        out: list[str] = []
        for _ in range(self.window if count is None else count):
            nxt = self._next.get(key)
            if nxt is None:
                break
            out.append(nxt)
            key = nxt
        return out

    def prefetch_after(self, key: str, size: int, exclude: Container[str] = ()) -> None:
        """Start fetching the ``window`` chunks after ``key`` (``size``-byte host buffers).

        Keys in ``exclude`` (the rest of a batch being fetched anyway) are passed over.
        """
        if self.window <= 0:
            return
        loop = asyncio.get_running_loop()
        for nxt in self.following(key):
            if nxt in self._ahead or nxt in exclude:
                continue
            self._ahead[nxt] = loop.create_task(self._fetch(nxt, size))
            self.stats.issued += 1
        while len(self._ahead) > self.capacity:
            _, task = self._ahead.popitem(last=False)
            task.cancel()
            self.stats.wasted += 1

    async def _fetch(self, key: str, size: int) -> tuple[bytearray, int] | None:
        buf = bytearray(size)
        try:
            n = await self.store.get_into(key, memoryview(buf))
        except Exception as exc:  # a failed prefetch is only a missed chance
            log.debug("prefetch of %r failed: %s", key, exc)
            return None
        return None if n is None else (buf, n)

    async def get_into(
        self, key: str, dest: memoryview, *, batch: Container[str] = ()
    ) -> int | None:
        """``ChunkStore.get_into``, served from the prefetch buffer when the chunk is there.

        ``batch``: the other keys fetched with this one (straight into their own buffers).
        """
        task = self._ahead.pop(key, None)
        self.prefetch_after(key, len(dest), batch)
        if task is not None:
            result = await task
            if result is not None and result[1] <= len(dest):
                buf, n = result
                dest[:n] = memoryview(buf)[:n]
                self.stats.hits += 1
                return n
        self.stats.misses += 1
        return await self.store.get_into(key, dest)

    def discard(self, key: str) -> None:
        task = self._ahead.pop(key, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._ahead.values())
        self._ahead.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
