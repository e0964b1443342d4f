"""Store and fetch a KV-cache-shaped tensor, raw bytes and a batch through a GPUCache target."""

from __future__ import annotations

import sys
import time

import anyio
import torch

from kvext.client import KVClient

NQN = "nqn.2024-01.io.gpucache:kv0"


async def main(address: str) -> None:
    async with KVClient.connect(address, NQN, io_queues=4, queue_depth=32) as kv:
        # One 256-token chunk of one layer's K and V for an 8-head, 128-dim model, fp16.
        chunk = torch.randn(2, 256, 8, 128, dtype=torch.float16)
        start = time.perf_counter()
        await kv.put("llama/layer-0/chunk-0", chunk)
        back = await kv.get("llama/layer-0/chunk-0")
        assert isinstance(back, torch.Tensor)
        assert torch.equal(back, chunk)
        out = torch.empty_like(chunk)
        await kv.get("llama/layer-0/chunk-0", out=out)  # lands in `out`, no copy
        assert torch.equal(out, chunk)
        print(
            f"tensor {tuple(chunk.shape)} {chunk.dtype}: put+get+get(out=) ok "
            f"in {1000 * (time.perf_counter() - start):.1f} ms"
        )

        items = [(f"doc-{i}", f"value {i}".encode() * 100) for i in range(256)]
        await kv.put_many(items)
        values = await kv.get_many([k for k, _ in items])
        assert values == [v for _, v in items]
        print(f"batch of {len(items)} values over {len(kv.controller.io_queues)} queues: ok")
        print("exists doc-0:", await kv.exists("doc-0"), "| exists nope:", await kv.exists("nope"))
        print(f"{len(await kv.list(max_keys=4096))} keys on the target")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:4420")
