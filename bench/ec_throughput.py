"""``gpucache cluster bench``: erasure-coded (k+m over k+m spawned targets) put/get throughput next
to a single spawned target's, in the same run, as a ratio.

For each value size and in-flight count, ``inflight`` workers loop over one shared client (the
cluster's ``ClusterKV``, or a ``KVClient`` on the single target) for ``--seconds`` or
``--max-ops``, gets landing in a preallocated buffer per worker (``get(key, out=...)``). GB/s is
value bytes (not fragment bytes) per second; ``ec/single`` is the cluster's GB/s over the single
target's. Every target is a child process on loopback, so on a small machine the cluster's targets
share the cores with the client; the ratio says what coding costs there, not what many hosts give.
Nothing here judges the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
import attrs

from bench.kv_throughput import DEFAULT_NQN, size_label
from nvmeof.units import parse_size

DEFAULT_SIZES = "4MiB,32MiB"
DEFAULT_INFLIGHT = "1,4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"value sizes ({DEFAULT_SIZES})")
    parser.add_argument(
        "--inflight", default=DEFAULT_INFLIGHT, help=f"in flight ({DEFAULT_INFLIGHT})"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per cell")
    parser.add_argument("--max-ops", type=int, default=1000, help="stop a cell after this many")
    parser.add_argument("-k", type=int, default=4, help="data fragments (4)")
    parser.add_argument("-m", type=int, default=2, help="parity fragments (2)")


@attrs.frozen
class EcCell:
    op: str
    size: int
    inflight: int
    single_gbps: float
    ec_gbps: float
    ec_ops: int

    @property
    def ratio(self) -> float:
        return self.ec_gbps / self.single_gbps if self.single_gbps > 0 else float("nan")


async def _cell(
    inflight: int, seconds: float, max_ops: int, op: Callable[[int], Awaitable[object]]
) -> tuple[int, float]:
    done = 0
    started = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(w: int) -> None:
        nonlocal done, started
        while started < inflight or (started < max_ops and time.perf_counter() < deadline):
            started += 1
            await op(w)
            done += 1

    async with anyio.create_task_group() as tg:
        for w in range(inflight):
            tg.start_soon(worker, w)
    return done, time.perf_counter() - start


class _Client(Protocol):
    async def put(self, key: str, value: bytes, /) -> object: ...
    async def get(self, key: str, /, *, out: object = None) -> object: ...


def _op(
    client: _Client, op: str, keys: list[str], value: bytes, buffers: list[bytearray]
) -> Callable[[int], Awaitable[object]]:
    if op == "put":
        return lambda w: client.put(keys[w], value)
    return lambda w: client.get(keys[w], out=buffers[w])


async def _run(
    args: argparse.Namespace,
    single: tuple[str, int],
    cluster_targets: Sequence[tuple[str, int]],
    nqn: str,
) -> list[EcCell]:
    from ec.cluster import ClusterKV
    from ec.clustermap import ClusterMap, TargetEntry
    from ec.link import LinkOptions
    from kvext.client import KVClient

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    inflights = [int(s) for s in args.inflight.split(",") if s.strip()]
    cmap = ClusterMap(
        targets=tuple(
            TargetEntry(f"t{i}", host, port, subnqn=nqn)
            for i, (host, port) in enumerate(cluster_targets)
        ),
        k=args.k,
        m=args.m,
    )
    cells: list[EcCell] = []
    options = LinkOptions(command_timeout=120.0, queue_depth=max(inflights) * 2)
    async with (
        KVClient.connect(single, nqn, io_queues=2, queue_depth=max(inflights) * 2) as kv,
        ClusterKV.open(cmap, options=options) as cluster,
    ):
        kv.timeout = 120.0
        await cluster.probe()  # connect every target before the clock starts
        for size in sizes:
            value = os.urandom(size)
            buffers = [bytearray(size) for _ in range(max(inflights))]
            keys = [f"ecbench-{size}-{w}" for w in range(max(inflights))]
            for op in ("put", "get"):
                for n in inflights:
                    results = []
                    for client in (kv, cluster):
                        if op == "get":
                            for key in keys:
                                await client.put(key, value)
                        ops, secs = await _cell(
                            n, args.seconds, args.max_ops, _op(client, op, keys, value, buffers)
                        )
                        results.append((ops, secs))
                    (s_ops, s_secs), (e_ops, e_secs) = results
                    cell = EcCell(
                        op, size, n, s_ops * size / s_secs / 1e9, e_ops * size / e_secs / 1e9, e_ops
                    )
                    cells.append(cell)
            for key in keys:
                await kv.delete(key)
                await cluster.delete(key)
    return cells


def format_table(cells: Sequence[EcCell], k: int, m: int) -> str:
    head = ["op", "size", "inflight", "single GB/s", f"ec {k}+{m} GB/s", "ec ops", "ec/single"]
    rows = [head] + [
        [
            c.op,
            size_label(c.size),
            str(c.inflight),
            f"{c.single_gbps:.3f}",
            f"{c.ec_gbps:.3f}",
            str(c.ec_ops),
            f"{c.ratio:.2f}x",
        ]
        for c in cells
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from nvmeof.testing import spawn_target

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    max_value = max(sizes) + (1 << 20)
    spawn_args = ("--capacity", "4GiB", "--max-value-size", str(max_value))
    wall = time.perf_counter()
    with contextlib.ExitStack() as stack:
        single = stack.enter_context(spawn_target(*spawn_args, nqn=DEFAULT_NQN))
        members = [
            stack.enter_context(spawn_target(*spawn_args, nqn=DEFAULT_NQN))
            for _ in range(args.k + args.m)
        ]
        print(
            f"gpucache cluster bench: EC {args.k}+{args.m} over {len(members)} spawned targets vs"
            f" one spawned target; {args.seconds:g} s per cell, backend {args.backend}",
            flush=True,
        )
        cells = anyio.run(
            _run, args, single.address, [t.address for t in members], DEFAULT_NQN,
            backend=args.backend,
        )  # fmt: skip
    print()
    print(format_table(cells, args.k, args.m))
    print()
    print(
        "GB/s = 1e9 bytes/s of value data (the cluster moves (k+m)/k of it); ec/single = the"
        " cluster's GB/s over the single target's, same size and in-flight."
    )
    print(f"total wall time {time.perf_counter() - wall:.1f} s")
    return 0
