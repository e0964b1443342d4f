"""LMCache in-process mode: GPUCache as LMCache's remote KV store (a ``RemoteConnector``).

Needs ``lmcache`` installed (this module imports it; nothing else in kvext does). Two ways to
name it in LMCache's YAML (see docs/lmcache.md):

- plugin (LMCache's Remote Storage Plugin Framework)::

    remote_storage_plugins: ["gpucache"]
    extra_config:
      remote_storage_plugin.gpucache.module_path: kvext.lmcache.connector
      remote_storage_plugin.gpucache.class_name: GPUCacheConnectorAdapter
      remote_storage_plugin.gpucache.url: "nvmeof://127.0.0.1:4420/nqn.2024-01.io.gpucache:kv0"

- legacy ``remote_url: nvmeof://...`` with the same two ``module_path``/``class_name`` lines
  (LMCache then finds the adapter by its URL scheme).

What LMCache calls, and what goes on the wire (``kvext.lmcache.store``): ``put`` is one Store of
the memory object's own buffer; ``get`` allocates a full-chunk memory object from LMCache's local
CPU backend and Retrieves into it (a partial last chunk comes back shortened by LMCache's own
``reshape_partial_chunk``); ``batched_async_contains`` / ``batched_contains`` are one round of
pipelined Exist commands; batched gets and puts keep every chunk in flight at once. Keys are
``CacheEngineKey.to_string()`` (which carries the model, world size, worker, chunk hash, dtype and
request tags) behind a ``salt`` from the URL; the string is hashed to a 16-byte wire key and
checked in full on every read.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Container, Coroutine, Sequence
from typing import Any, TypeVar

from lmcache.v1.storage_backend.connector import (
    ConnectorAdapter,
    ConnectorContext,
    extract_plugin_type,
)
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from kvext.lmcache.store import ChunkStore, Prefetcher, byte_view, chunk_key
from kvext.lmcache.url import SCHEME, TargetURL

log = logging.getLogger("kvext.lmcache")

PLUGIN_TYPE = "gpucache"
T = TypeVar("T")


class GPUCacheConnectorAdapter(ConnectorAdapter):  # type: ignore[misc]
    """Makes ``GPUCacheConnector``s for ``nvmeof://`` URLs and ``plugin://gpucache[.name]``."""

    def __init__(self) -> None:
        super().__init__(f"{SCHEME}://")

    def can_parse(self, url: str) -> bool:
        if url.startswith(f"{SCHEME}://"):
            return True
        if url.startswith("plugin://"):
            return bool(extract_plugin_type(url.removeprefix("plugin://")) == PLUGIN_TYPE)
        return False

    def create_connector(self, context: ConnectorContext) -> GPUCacheConnector:
        url = context.url
        if url.startswith("plugin://"):
            name = context.plugin_name or url.removeprefix("plugin://")
            extra = (context.config.extra_config if context.config else None) or {}
            url = extra.get(f"remote_storage_plugin.{name}.url") or ""
            if not url:
                raise ValueError(f"set extra_config remote_storage_plugin.{name}.url")
        return GPUCacheConnector(
            TargetURL.parse(url),
            loop=context.loop,
            local_cpu_backend=context.local_cpu_backend,
            config=context.config,
            metadata=context.metadata or context.local_cpu_backend.metadata,
        )


class GPUCacheConnector(RemoteConnector):  # type: ignore[misc]
    """LMCache's ``RemoteConnector`` over a GPUCache target (``ChunkStore``)."""

    def __init__(
        self,
        url: TargetURL,
        *,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: Any,
        config: Any,
        metadata: Any,
        namespace: str = "v1",
    ) -> None:
        super().__init__(config, metadata)
        self.url = url
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.namespace = namespace
        self.store = ChunkStore(url)
        self.prefetcher = Prefetcher(self.store, url.prefetch)
        self.sync_timeout = float(getattr(config, "blocking_timeout_secs", 10) or 10)
        log.info("GPUCache connector for %s", url)

    def __repr__(self) -> str:
        return f"<GPUCacheConnector {self.url}>"

    def _key(self, key: Any) -> str:
        return chunk_key(self.namespace, self.url.salt, key.to_string())

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the connector's loop from another thread, and wait for it."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RuntimeError("a blocking connector call on the connector's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.sync_timeout)

    # --- what every RemoteConnector has -------------------------------------------------------
    async def exists(self, key: Any) -> bool:
        return (await self.store.exists_many([self._key(key)]))[0]

    def exists_sync(self, key: Any) -> bool:
        return self._sync(self.exists(key))

    async def get(self, key: Any) -> Any:
        return await self._get(self._key(key))

    async def _get(self, skey: str, batch: Container[str] = ()) -> Any:
        obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
        if obj is None:
            log.debug("no local CPU memory for %s", skey)
            return None
        try:
            n = await self.prefetcher.get_into(skey, byte_view(obj.byte_array), batch=batch)
        except BaseException:
            obj.ref_count_down()
            raise
        if n is None:
            obj.ref_count_down()
            return None
        return self.reshape_partial_chunk(obj, n)

    async def put(self, key: Any, memory_obj: Any) -> None:
        skey = self._key(key)
        self.prefetcher.discard(skey)
        await self.store.put(skey, byte_view(memory_obj.byte_array))

    async def list(self) -> list[str]:
        """Wire keys as hex: chunks travel as 16-byte hashes of their key strings."""
        return [k.hex() for k in await self.store.list()]

    async def close(self) -> None:
        await self.prefetcher.close()
        await self.store.close()

    def remove_sync(self, key: Any) -> bool:
        skey = self._key(key)
        self.prefetcher.discard(skey)
        self._sync(self.store.delete(skey))
        return True

    # --- batches ------------------------------------------------------------------------------
    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: Sequence[Any]) -> builtins.list[Any]:
        skeys = [self._key(k) for k in keys]
        self.prefetcher.learn(skeys)
        batch = frozenset(skeys)
        results = await asyncio.gather(
            *(self._get(k, batch) for k in skeys), return_exceptions=True
        )
        out: list[Any] = []
        for r in results:
            if isinstance(r, BaseException):
                log.warning("batched get: %s", r)
                out.append(None)
            else:
                out.append(r)
        return out

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: Sequence[Any], memory_objs: Sequence[Any]) -> None:
        await asyncio.gather(*(self.put(k, o) for k, o in zip(keys, memory_objs, strict=True)))

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(
        self, lookup_id: str, keys: Sequence[Any], pin: bool = False
    ) -> int:
        skeys = [self._key(k) for k in keys]
        self.prefetcher.learn(skeys)
        return await self.store.prefix_hits(skeys)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: Sequence[Any]) -> int:
        skeys = [self._key(k) for k in keys]
        self.prefetcher.learn(skeys)
        return self._sync(self.store.prefix_hits(skeys))

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(
        self, lookup_id: str, keys: Sequence[Any]
    ) -> builtins.list[Any]:
        """The leading chunks that were found; the rest are released."""
        objs = await self.batched_get(keys)
        hits = next((i for i, obj in enumerate(objs) if obj is None), len(objs))
        out = objs[:hits]
        for obj in objs[hits:]:
            if obj is not None:
                obj.ref_count_down()
        return out
