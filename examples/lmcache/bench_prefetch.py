"""KV-aware prefetch, measured: hit latency of chunk-by-chunk prefix reads, with and without it.

    python examples/lmcache/bench_prefetch.py [--delay-ms 1] [--compute-ms 2] [--chunks 32]

No LMCache needed: this drives ``kvext.lmcache.store`` (the core both connectors use) against a
DRAM target on loopback, through a proxy that delays every byte by ``--delay-ms`` in each direction
(so a round trip costs 2x that, like a network hop). A reader fetches a prefix chain one chunk at
a time and spends ``--compute-ms`` on each (a model loading layer by layer); the chain was learned
from the lookup beforehand, as the connectors learn it from LMCache's lookups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time

import anyio.from_thread

from kvext.lmcache.store import ChunkStore, Prefetcher
from kvext.lmcache.url import TargetURL
from nvmeof.testing import serve_target


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(1 << 20)
            await queue.put((loop.time() + delay, data))
            if not data:
                break
    except (ConnectionError, OSError):
        await queue.put((0.0, b""))
    await task


async def delay_proxy(target: tuple[str, int], delay: float) -> asyncio.Server:
    """A loopback TCP proxy that delays each direction by ``delay`` seconds, keeping order."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection(*target)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(_pump(r, tw, delay), _pump(tr, w, delay), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def run(target: tuple[str, int], nqn: str, args: argparse.Namespace) -> None:
    proxy = await delay_proxy(target, args.delay_ms / 1000)
    port = proxy.sockets[0].getsockname()[1]
    url = TargetURL(host="127.0.0.1", port=port, subnqn=nqn, queues=4)
    store = ChunkStore(url)
    size = args.chunk_kib * 1024
    print(
        f"one-way delay {args.delay_ms} ms (RTT {2 * args.delay_ms} ms), {args.chunks} chunks of"
        f" {args.chunk_kib} KiB, {args.compute_ms} ms compute per chunk, {args.rounds} rounds"
    )
    print(
        f"{'window':>6} {'mean ms':>8} {'p50 ms':>7} {'p90 ms':>7} {'first ms':>8} {'total ms':>9}"
    )
    for window in args.windows:
        lat: list[float] = []
        firsts: list[float] = []
        totals: list[float] = []
        for r in range(args.rounds):
            chain = [f"bench/{window}/{r}/{i}" for i in range(args.chunks)]
            for k in chain:
                await store.put(k, os.urandom(size))
            prefetch = Prefetcher(store, window)
            prefetch.learn(chain)
            await store.prefix_hits(chain)  # the lookup, as LMCache does before a retrieve
            dest = memoryview(bytearray(size))
            t_start = time.perf_counter()
            for i, k in enumerate(chain):
                t0 = time.perf_counter()
                n = await prefetch.get_into(k, dest)
                took = 1000 * (time.perf_counter() - t0)
                assert n == size
                (firsts if i == 0 else lat).append(took)
                await asyncio.sleep(args.compute_ms / 1000)
            totals.append(1000 * (time.perf_counter() - t_start))
            await prefetch.close()
        q = statistics.quantiles(lat, n=10)
        print(
            f"{window:>6} {statistics.mean(lat):>8.2f} {q[4]:>7.2f} {q[8]:>7.2f}"
            f" {statistics.mean(firsts):>8.2f} {statistics.mean(totals):>9.1f}"
        )
    await store.close()
    proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--compute-ms", type=float, default=2.0)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    args = parser.parse_args()
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_target()) as running,
    ):
        asyncio.run(run(running.address, running.nqn, args))


if __name__ == "__main__":
    main()
