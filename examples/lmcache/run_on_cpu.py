"""Run LMCache's own storage path against a GPUCache target, on CPU (no GPU needed).

    python examples/lmcache/run_on_cpu.py                  # starts a DRAM target in-process
    python examples/lmcache/run_on_cpu.py --url nvmeof://127.0.0.1:4420/nqn.2024-01.io.gpucache:kv0

Needs ``lmcache`` installed (docs/lmcache.md). Both LMCache modes, through LMCache's classes:

- in-process: the YAML's ``remote_storage_plugins`` config builds LMCache's ``RemoteBackend``, which
  loads ``kvext.lmcache.connector`` as a plugin; chunks are LMCache ``MemoryObj``s from its
  ``LocalCPUBackend`` (a full and a partial last chunk), stored, looked up, fetched and compared;
- MP: the ``l2_adapters`` JSON goes through LMCache's ``--l2-adapter`` parser and factory, which
  wrap ``kvext.lmcache.native.GPUCacheL2Client`` in LMCache's ``NativeConnectorL2Adapter``; chunks
  are stored, locked-and-looked-up (two tenants: each sees only its own) and loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def local_target() -> Iterator[str]:
    """A DRAM GPUCache target on a free loopback port, served from a background thread."""
    import anyio.from_thread

    from nvmeof.testing import serve_target

    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_target()) as running,
    ):
        yield f"nvmeof://{running.host}:{running.port}/{running.nqn}?queues=4"


# --- in-process mode ------------------------------------------------------------------------------
class InProcess:
    """LMCache's RemoteBackend over GPUCache, as LMCache builds it from the YAML."""

    def __init__(self, url: str, *, chunk_size: int = 16, layers: int = 4, salt: str = "") -> None:
        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
        from lmcache.v1.storage_backend.remote_backend import RemoteBackend

        config = LMCacheEngineConfig.from_file(str(HERE / "lmcache-inprocess.yaml"))
        if salt:
            url += ("&" if "?" in url else "?") + f"salt={salt}"
        config.extra_config["remote_storage_plugin.gpucache.url"] = url
        config.chunk_size = chunk_size
        config.max_local_cpu_size = 0.05
        self.metadata = LMCacheMetadata(
            model_name="demo/model",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(layers, 2, chunk_size, 2, 64),
            chunk_size=chunk_size,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cpu = LocalCPUBackend(config, self.metadata)
        self.backend = RemoteBackend(
            config, self.metadata, self.loop, self.cpu, plugin_name="gpucache"
        )
        if self.backend.connection is None:
            raise RuntimeError("LMCache could not create the GPUCache connector (see its log)")
        self.connector: Any = self.backend.connection._connector  # under LMCache's instrumentation

    def key(self, i: int) -> Any:
        import torch
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey("demo/model", 1, 0, 0x1000 + i, torch.bfloat16)

    def chunk(self, tokens: int | None = None) -> Any:
        """An LMCache memory object of random KV (``tokens`` < chunk size: a partial chunk)."""
        import torch

        c = self.connector
        shape = list(c.meta_shapes[0])
        shape[2] = tokens or shape[2]
        obj = self.cpu.allocate([torch.Size(shape)], c.meta_dtypes, c.meta_fmt)
        obj.tensor.copy_(torch.randn(shape).to(obj.tensor.dtype))
        return obj

    def close(self) -> None:
        self.backend.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def run_inprocess(url: str, chunks: int = 8) -> dict[str, Any]:
    import torch

    lmc = InProcess(url)
    try:
        keys = [lmc.key(i) for i in range(chunks)]
        objs = [lmc.chunk() for _ in range(chunks - 1)] + [lmc.chunk(tokens=5)]  # partial last
        expect = [o.tensor.clone() for o in objs]
        t0 = time.perf_counter()
        for key, obj in zip(keys, objs, strict=True):
            lmc.backend.submit_put_task(key, obj).result(10)
        t_put = time.perf_counter() - t0
        for obj in objs:
            obj.ref_count_down()
        t0 = time.perf_counter()
        prefix = lmc.backend.batched_contains([*keys, lmc.key(999)])
        t_lookup = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = lmc.backend.batched_get_blocking(keys)
        t_get = time.perf_counter() - t0
        same = [
            g is not None and torch.equal(g.tensor, e) for g, e in zip(got, expect, strict=True)
        ]
        partial = None if got[-1] is None else int(got[-1].tensor.shape[2])
        for g in got:
            if g is not None:
                g.ref_count_down()
        miss = lmc.backend.get_blocking(lmc.key(999))
        return {
            "stored": chunks,
            "prefix_hits": prefix,
            "all_equal": all(same),
            "partial_chunk_tokens": partial,
            "miss_is_none": miss is None,
            "ms_put": 1000 * t_put,
            "ms_lookup": 1000 * t_lookup,
            "ms_batched_get": 1000 * t_get,
        }
    finally:
        lmc.close()


# --- MP mode ------------------------------------------------------------------------------------
def mp_adapter(url: str) -> Any:
    """LMCache's L2 adapter for the YAML's ``l2_adapters`` entry, built by LMCache's own parser."""
    import yaml
    from lmcache.v1.distributed.l2_adapters.config import (
        add_l2_adapters_args,
        parse_args_to_l2_adapters_config,
    )
    from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry

    spec = yaml.safe_load((HERE / "lmcache-mp.yaml").read_text())["l2_adapters"][0]
    spec["adapter_params"]["url"] = url
    parser = add_l2_adapters_args(argparse.ArgumentParser())
    config = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)]))
    return create_l2_adapter_from_registry(config.adapters[0])


def wait_fd(fd: int, timeout: float = 10.0) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        raise TimeoutError("no completion from the L2 adapter")
    os.eventfd_read(fd)


def run_mp(url: str, chunks: int = 8) -> dict[str, Any]:
    import torch
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.memory_allocators.tensor_memory_allocator import TensorMemoryAllocator
    from lmcache.v1.memory_management import MemoryFormat

    adapter = mp_adapter(url)
    try:
        alloc = TensorMemoryAllocator(torch.empty(8 << 20, dtype=torch.uint8))
        shape = torch.Size([2, 4, 16, 128])

        def keys(salt: str) -> list[Any]:
            return [
                ObjectKey(chunk_hash=i.to_bytes(8, "big"), model_name="demo/model", kv_rank=0,
                          cache_salt=salt)
                for i in range(chunks)
            ]  # fmt: skip

        def new() -> Any:
            return alloc.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)

        alice, bob = keys("alice"), keys("bob")
        objs = [new() for _ in alice]
        for o in objs:
            o.tensor.copy_(torch.randn(shape).to(torch.bfloat16))
        t0 = time.perf_counter()
        adapter.submit_store_task(alice, objs)
        wait_fd(adapter.get_store_event_fd())
        t_put = time.perf_counter() - t0
        stored = adapter.pop_completed_store_tasks()
        layout = {0: MemoryLayoutDesc([shape], [torch.bfloat16])}
        t0 = time.perf_counter()
        task = adapter.submit_lookup_and_lock_task(alice + bob, layout)
        wait_fd(adapter.get_lookup_and_lock_event_fd())
        t_lookup = time.perf_counter() - t0
        found = adapter.query_lookup_and_lock_result(task)
        outs = [new() for _ in alice]
        t0 = time.perf_counter()
        task = adapter.submit_load_task(alice, outs)
        wait_fd(adapter.get_load_event_fd())
        t_get = time.perf_counter() - t0
        loaded = adapter.query_load_result(task)
        adapter.submit_unlock(alice)
        return {
            "stored_ok": bool(stored) and all(int(r) >= 0 for r in stored.values()),
            "alice_found": [found.test(i) for i in range(chunks)].count(True),
            "bob_found": [found.test(chunks + i) for i in range(chunks)].count(True),
            "loaded": [loaded.test(i) for i in range(chunks)].count(True),
            "all_equal": all(
                torch.equal(a.tensor, b.tensor) for a, b in zip(objs, outs, strict=True)
            ),
            "ms_put": 1000 * t_put,
            "ms_lookup": 1000 * t_lookup,
            "ms_batched_get": 1000 * t_get,
        }
    finally:
        adapter.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an nvmeof:// URL (default: start a DRAM target here)")
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_target())
        print(f"target: {url}")
        ok = True
        for mode, run in (("in-process", run_inprocess), ("MP", run_mp)):
            result = run(url, args.chunks)
            print(f"{mode}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in result.items()))  # fmt: skip
            ok = ok and bool(result["all_equal"])
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
