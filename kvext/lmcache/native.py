"""LMCache multiprocess (MP) mode: GPUCache as a ``native_plugin`` L2 connector.

LMCache's MP server wraps any object with ``event_fd()``, ``submit_batch_get/set/exists/delete``,
``drain_completions()`` and ``close()`` in its ``NativeConnectorL2Adapter``
(``lmcache/v1/distributed/l2_adapters/native_connector_l2_adapter.py``), configured with::

    --l2-adapter '{"type": "native_plugin",
                   "module_path": "kvext.lmcache.native",
                   "class_name": "GPUCacheL2Client",
                   "adapter_params": {"url": "nvmeof://127.0.0.1:4420/nqn.2024-01.io.gpucache:kv0"}}'

This class needs no LMCache import: LMCache hands it key strings (``ObjectKey`` serialised as
``model@kv_rank@group@chunk_hash[@cache_salt]``, so the tenant's ``cache_salt`` is part of the
key) and byte memoryviews of its L1 memory objects. Each submit returns a future id at once; the
batch runs on the client's own event-loop thread (every chunk in flight at once, spread over the
I/O queues), then its completion ``(future_id, ok, error, per_key_results)`` is queued and the
eventfd is signalled. Gets land in LMCache's buffers directly; exists is one round of pipelined
Exist commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Awaitable, Sequence
from typing import Any

from kvext.lmcache.store import ChunkStore, Prefetcher, byte_view, chunk_key
from kvext.lmcache.url import TargetURL

log = logging.getLogger("kvext.lmcache")

Completion = tuple[int, bool, str, list[bool] | None]


class GPUCacheL2Client:
    """A ``native_plugin`` L2 connector for LMCache's MP mode, over a GPUCache target."""

    def __init__(self, url: str, *, namespace: str = "mp", **_ignored: Any) -> None:
        if _ignored:
            log.warning("GPUCacheL2Client: ignoring adapter_params %s", sorted(_ignored))
        self.url = TargetURL.parse(url)
        self.namespace = namespace
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._done: list[Completion] = []
        self._ids = itertools.count(1)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gpucache-l2", daemon=True
        )
        self._thread.start()
        self.store = ChunkStore(self.url)
        self.prefetcher = Prefetcher(self.store, self.url.prefetch)

    def _key(self, key: str) -> str:
        return chunk_key(self.namespace, self.url.salt, key)

    # --- the native connector interface -------------------------------------------------------
    def event_fd(self) -> int:
        return self._efd

    def submit_batch_get(self, keys: Sequence[str], buffers: Sequence[Any]) -> int:
        skeys = [self._key(k) for k in keys]
        views = [byte_view(b) for b in buffers]
        if len(views) != len(skeys):
            raise ValueError("keys and buffers differ in length")

        async def run() -> list[bool]:
            self.prefetcher.learn(skeys)
            batch = frozenset(skeys)

            async def one(key: str, view: memoryview) -> bool:
                return await self.prefetcher.get_into(key, view, batch=batch) == len(view)

            return list(
                await asyncio.gather(*(one(k, v) for k, v in zip(skeys, views, strict=True)))
            )

        return self._submit(run())

    def submit_batch_set(self, keys: Sequence[str], buffers: Sequence[Any]) -> int:
        skeys = [self._key(k) for k in keys]
        views = [byte_view(b) for b in buffers]

        async def run() -> list[bool]:
            async def one(key: str, view: memoryview) -> bool:
                self.prefetcher.discard(key)
                await self.store.put(key, view)
                return True

            return list(
                await asyncio.gather(*(one(k, v) for k, v in zip(skeys, views, strict=True)))
            )

        return self._submit(run())

    def submit_batch_exists(self, keys: Sequence[str]) -> int:
        skeys = [self._key(k) for k in keys]

        async def run() -> list[bool]:
            self.prefetcher.learn(skeys)
            return await self.store.exists_many(skeys)

        return self._submit(run())

    def submit_batch_delete(self, keys: Sequence[str]) -> int:
        skeys = [self._key(k) for k in keys]

        async def run() -> list[bool]:
            for key in skeys:
                self.prefetcher.discard(key)
            await asyncio.gather(*(self.store.delete(k) for k in skeys))
            return [True] * len(skeys)

        return self._submit(run())

    def drain_completions(self) -> list[Completion]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            await self.prefetcher.close()
            await self.store.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        except Exception as exc:
            log.warning("closing %s: %s", self.url, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        os.close(self._efd)

    # --- internals ----------------------------------------------------------------------------
    def _submit(self, batch: Awaitable[list[bool]]) -> int:
        if self._closed:
            raise RuntimeError("GPUCacheL2Client is closed")
        future_id = next(self._ids)
        asyncio.run_coroutine_threadsafe(self._complete(future_id, batch), self._loop)
        return future_id

    async def _complete(self, future_id: int, batch: Awaitable[list[bool]]) -> None:
        try:
            results = await batch
            completion: Completion = (future_id, True, "", results)
        except Exception as exc:
            log.warning("batch %d failed: %s", future_id, exc)
            completion = (future_id, False, str(exc) or type(exc).__name__, None)
        with self._lock:
            self._done.append(completion)
        os.eventfd_write(self._efd, 1)
