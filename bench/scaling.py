"""Scaling with cores: ``gpucache target --workers 1`` vs ``--workers N``, from client processes.

For each worker count it spawns the target, then ``--clients`` client processes (each a
``RoutedKVClient``: every key goes to the worker that owns it) that start together at an agreed
time and run, per value size, ``--seconds`` of puts and then ``--seconds`` of gets with
``--inflight`` commands in flight over ``--queues`` I/O queues per worker. It prints the aggregate
ops/s and GB/s of each cell, the ratio of N workers to one, and the CPU seconds the target's
processes spent per GB (what the cores buy, independent of how many cores the clients took).
``--repeat`` runs the whole comparison again and prints the spread. Nothing here judges the numbers.

    python -m bench.scaling --workers 2 --clients 2 --sizes 4KiB,4MiB --inflight 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from nvmeof.testing import spawn_target
from nvmeof.units import parse_size

NQN = "nqn.2024-01.io.gpucache:scaling"
_TICK = os.sysconf("SC_CLK_TCK")


# --- one client process ---------------------------------------------------------------------------
async def _client(args: argparse.Namespace) -> dict[str, Any]:
    from kvext.sharding import RoutedKVClient

    results: dict[str, Any] = {}
    async with RoutedKVClient.connect(
        args.client, NQN, io_queues=args.queues, queue_depth=max(args.inflight, 2)
    ) as kv:
        kv.timeout = 60.0
        start = args.start_at
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            value = os.urandom(size)
            keys = [f"{args.prefix}-{size}-{i}".encode() for i in range(args.inflight)]
            outs = [bytearray(size) for _ in keys]
            for phase in ("put", "get"):
                if phase == "get":
                    for key in keys:
                        await kv.put(key, value)
                await anyio.sleep(max(0.0, start - time.time()))
                end = start + args.seconds
                ops = 0

                async def worker(
                    key: bytes, out: bytearray, value: bytes, phase: str, end: float
                ) -> None:
                    nonlocal ops
                    while time.time() < end:
                        if phase == "put":
                            await kv.put(key, value)
                        else:
                            await kv.get(key, out=out)
                        ops += 1

                t0 = time.time()
                async with anyio.create_task_group() as tg:
                    for key, out in zip(keys, outs, strict=True):
                        tg.start_soon(worker, key, out, value, phase, end)
                results[f"{phase} {size}"] = {"ops": ops, "seconds": time.time() - t0}
                start = end + args.gap
            for key in keys:
                await kv.delete(key)
    return results


# --- the driver -----------------------------------------------------------------------------------
def _cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def _target_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def _run(args: argparse.Namespace, workers: int) -> dict[str, dict[str, float]]:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    cells = [f"{phase} {size}" for size in sizes for phase in ("put", "get")]
    extra = ["--workers", str(workers)] if workers > 1 else []
    with spawn_target(
        "--capacity", args.capacity, "--max-value-size", "64MiB", "--no-discovery",
        "-r", f"/tmp/gpucache-scaling-{os.getpid()}.sock", *extra, nqn=NQN,
    ) as target:  # fmt: skip
        assert target.process is not None
        pids = _target_pids(target.process.pid)
        lead = 2.0 + 0.3 * args.clients
        start_at = time.time() + lead
        window = args.seconds + args.gap
        cpu_marks: list[float] = []
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.scaling",
                    "--client",
                    f"{target.host}:{target.port}",
                    "--prefix",
                    f"c{c}",
                    "--start-at",
                    repr(start_at),
                    "--sizes",
                    args.sizes,
                    "--seconds",
                    str(args.seconds),
                    "--inflight",
                    str(args.inflight),
                    "--queues",
                    str(args.queues),
                    "--gap",
                    str(args.gap),
                ],
                stdout=subprocess.PIPE,
            )
            for c in range(args.clients)
        ]
        # Sample the target's CPU at each cell's edges (the clients run on the same clock).
        for i in range(len(cells) + 1):
            time.sleep(max(0.0, start_at + i * window - time.time()))
            cpu_marks.append(_cpu_seconds(pids))
        outputs = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    table: dict[str, dict[str, float]] = {}
    for i, cell in enumerate(cells):
        size = int(cell.split()[1])
        ops_per_s = sum(o[cell]["ops"] / o[cell]["seconds"] for o in outputs)
        cpu = cpu_marks[i + 1] - cpu_marks[i]
        gb = sum(o[cell]["ops"] for o in outputs) * size / 1e9
        table[cell] = {
            "ops_per_s": ops_per_s,
            "gb_per_s": ops_per_s * size / 1e9,
            "target_cpu_s_per_gb": cpu / gb if gb else float("nan"),
            "target_cores_busy": cpu / args.seconds,
        }
    return table


def _label(cell: str) -> str:
    phase, size = cell.split()
    n = int(size)
    return f"{phase} {n >> 20}MiB" if n >= 1 << 20 else f"{phase} {n >> 10}KiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="compared with one worker")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--sizes", default="4KiB,4MiB")
    parser.add_argument("--inflight", type=int, default=32, help="commands in flight per client")
    parser.add_argument("--queues", type=int, default=2, help="I/O queues per worker per client")
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell")
    parser.add_argument("--gap", type=float, default=1.0, help="pause between cells")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--capacity", default="8GiB")
    parser.add_argument("--json", metavar="PATH", help="also write the runs here")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: be one client process
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        print(json.dumps(anyio.run(_client, args)))
        return 0
    print(f"{os.cpu_count()} CPUs; {args.clients} client processes; load {os.getloadavg()}")
    runs: list[dict[int, dict[str, dict[str, float]]]] = []
    for r in range(args.repeat):
        run = {n: _run(args, n) for n in (1, args.workers)}
        runs.append(run)
        print(f"run {r + 1}:")
        for cell in run[1]:
            one, many = run[1][cell], run[args.workers][cell]
            print(
                f"  {_label(cell):>9}: 1 worker {one['ops_per_s']:9.0f} ops/s"
                f" {one['gb_per_s']:6.2f} GB/s ({one['target_cpu_s_per_gb']:.2f} cpu-s/GB,"
                f" {one['target_cores_busy']:.2f} cores) | {args.workers} workers"
                f" {many['ops_per_s']:9.0f} ops/s {many['gb_per_s']:6.2f} GB/s"
                f" ({many['target_cpu_s_per_gb']:.2f} cpu-s/GB,"
                f" {many['target_cores_busy']:.2f} cores)"
                f" | x{many['ops_per_s'] / one['ops_per_s']:.2f}"
            )
    print("ratio N workers / 1 worker over the runs (median [min..max]):")
    for cell in runs[0][1]:
        ratios = [run[args.workers][cell]["ops_per_s"] / run[1][cell]["ops_per_s"] for run in runs]
        print(
            f"  {_label(cell):>9}: x{statistics.median(ratios):.2f}"
            f" [{min(ratios):.2f}..{max(ratios):.2f}]"
        )
    if args.json:
        Path(args.json).write_text(json.dumps([{str(k): v for k, v in r.items()} for r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
