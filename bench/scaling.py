"""Scaling with cores: ``gpucache target --workers 1`` vs ``--workers N``, from client processes.

For each worker count it spawns the target, then ``--clients`` client processes that start
together at an agreed time and run, per value size, ``--seconds`` of puts and then ``--seconds`` of
gets with ``--inflight`` commands in flight over ``--queues`` I/O queues per worker. Every key goes
to the worker that owns it. The clients are, with ``--client``:

- ``lean`` (default): ``bench.loadgen``, a pipelined generator over plain sockets with prebuilt
  capsules, which spends a small fraction of the target's CPU per command (as redis-benchmark
  does for Redis), so the target's cores, not the clients', bound the figures;
- ``routed``: ``RoutedKVClient``, our own initiator, which costs about as much CPU per command
  as the target: on a machine with few cores its clients compete with the target's workers.

It prints the aggregate ops/s and GB/s of each cell, the ratio of N workers to one, the CPU
seconds the target's processes spent per GB (what the cores buy, independent of how many cores
the clients took), and the cores the target, the clients and everything else on the machine kept
busy (a comparison where other work took the target's or the clients' cores is marked disturbed).
After each run it measures what the machine itself gives N CPU-bound processes (below N where
vCPUs share physical cores with each other or with other tenants): the ceiling for the ratio.
``--repeat`` runs the whole comparison again and prints the spread. On a shared machine,
``--nice -10`` (root) keeps other sessions' work off the target's cores and ``--pin`` gives each
worker a core of its own. Nothing here judges the numbers.

    python -m bench.scaling --workers 2 --clients 2 --sizes 4KiB --inflight 64 --pin --nice -10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
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
def _lean_client(args: argparse.Namespace) -> dict[str, Any]:
    from bench.loadgen import run

    host, _, port = args.run_client.rpartition(":")
    return run(
        (host, int(port)),
        NQN,
        sizes=[parse_size(s) for s in args.sizes.split(",")],
        seconds=args.seconds,
        inflight=args.inflight,
        queues=args.queues,
        prefix=args.prefix,
        start_at=args.start_at,
        gap=args.gap,
    )


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    from kvext.sharding import RoutedKVClient

    results: dict[str, Any] = {}
    async with RoutedKVClient.connect(
        args.run_client, NQN, io_queues=args.queues, queue_depth=max(args.inflight, 2)
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


# --- what the machine itself gives ---------------------------------------------------------------
def _spin(seconds: float, out: Any) -> None:
    """Interpreter-bound work (dict stores in a loop), counted: a stand-in for a busy worker."""
    table: dict[int, int] = {}
    rounds = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for i in range(1000):
            table[i & 255] = i * 3
        rounds += 1
    out.put(rounds / seconds)


def machine_ceiling(processes: int, seconds: float = 1.0) -> float:
    """How many times one process's work ``processes`` CPU-bound processes get done together:
    what the machine gives N workers that need no I/O at all (below N where cores are shared
    with other tenants, SMT siblings, or other work)."""
    ctx = multiprocessing.get_context("fork")

    def run(n: int) -> float:
        out = ctx.Queue()
        procs = [ctx.Process(target=_spin, args=(seconds, out)) for _ in range(n)]
        for p in procs:
            p.start()
        rates = [out.get() for _ in procs]
        for p in procs:
            p.join()
        return float(sum(rates))

    return run(processes) / run(1)


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


def _machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat less idle and iowait)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _target_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def _run(args: argparse.Namespace, workers: int) -> dict[str, dict[str, float]]:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    cells = [f"{phase} {size}" for size in sizes for phase in ("put", "get")]
    extra = ["--workers", str(workers)] if workers > 1 else []
    with spawn_target(
        "--capacity", args.capacity, "--max-value-size", "64MiB", "--no-discovery",
        "-r", f"/tmp/gpucache-scaling-{os.getpid()}.sock", "--poll-us", str(args.poll_us),
        *extra, nqn=NQN,
    ) as target:  # fmt: skip
        assert target.process is not None
        pids = _target_pids(target.process.pid)
        if args.pin:
            # each serving process on its own core (the supervisor, idle, and the clients float)
            serving = pids[1:] if workers > 1 else pids
            for i, pid in enumerate(serving):
                os.sched_setaffinity(pid, {sorted(os.sched_getaffinity(0))[i % _cpus()]})
        lead = 2.0 + 0.3 * args.clients
        start_at = time.time() + lead
        window = args.seconds + args.gap
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.scaling",
                    "--run-client",
                    f"{target.host}:{target.port}",
                    "--client",
                    args.client,
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
                env={**os.environ, "GPUCACHE_POLL_US": str(args.poll_us)},  # routed clients
            )
            for c in range(args.clients)
        ]
        client_pids = [p.pid for p in procs]
        # CPU seconds of the target, the clients and the whole machine at each cell's start and
        # end (the clients run on the same clock; the gap, where gets are prepared, is left out).
        marks: list[tuple[float, float, float]] = []
        for i in range(len(cells)):
            for edge in (0.0, args.seconds):
                time.sleep(max(0.0, start_at + i * window + edge - time.time()))
                marks.append(
                    (_cpu_seconds(pids), _cpu_seconds(client_pids), _machine_cpu_seconds())
                )
        outputs = []
        for p in procs:
            out = p.communicate(timeout=600)[0]
            if p.returncode:
                raise SystemExit(f"a client process failed (exit status {p.returncode})")
            outputs.append(json.loads(out))
    table: dict[str, dict[str, float]] = {}
    for i, cell in enumerate(cells):
        size = int(cell.split()[1])
        ops_per_s = sum(o[cell]["ops"] / o[cell]["seconds"] for o in outputs)
        (t0, c0, m0), (t1, c1, m1) = marks[2 * i], marks[2 * i + 1]
        gb = ops_per_s * args.seconds * size / 1e9
        served, clients, machine = (t1 - t0), (c1 - c0), (m1 - m0)
        table[cell] = {
            "ops_per_s": ops_per_s,
            "gb_per_s": ops_per_s * size / 1e9,
            "target_cpu_s_per_gb": served / gb if gb else float("nan"),
            "target_cores_busy": served / args.seconds,
            "client_cores_busy": clients / args.seconds,
            "other_cores_busy": max(0.0, machine - served - clients) / args.seconds,
        }
    return table


def _label(cell: str) -> str:
    phase, size = cell.split()
    n = int(size)
    return f"{phase} {n >> 20}MiB" if n >= 1 << 20 else f"{phase} {n >> 10}KiB"


DISTURBED_CORES = 0.15  # other load beyond the spare cores that marks a cell disturbed


def _quiet(cell: dict[str, float], workers: int) -> bool:
    """Whether other work left the target and the clients their cores: it may use what neither
    needs (the cores beyond the workers and the clients' share), and DISTURBED_CORES more."""
    spare = max(0.0, (os.cpu_count() or 1) - workers - cell["client_cores_busy"])
    return cell["other_cores_busy"] <= spare + DISTURBED_CORES


def _cores(cell: dict[str, float]) -> str:
    return (
        f"{cell['target_cores_busy']:.2f}+{cell['client_cores_busy']:.2f}"
        f"+{cell['other_cores_busy']:.2f} cores"
    )


_AUTOGROUP = Path("/proc/self/autogroup")


def _renice(nice: int) -> int | None:
    """This process and what it starts (the target, the clients) at ``nice``. Where the kernel
    groups tasks by session (autogroup), niceness only ranks tasks within a group, and every
    other session's group shares the cores equally with ours: the group's niceness is set too
    (it outlives this process: returns the group's old niceness, to put back)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        print(f"cannot set niceness {nice}: {exc}")
    try:
        old = int(_AUTOGROUP.read_text().split()[-1])
        _AUTOGROUP.write_text(str(nice))
    except (OSError, ValueError, IndexError) as exc:
        print(f"cannot set the autogroup's niceness {nice}: {exc}")
        return None
    return old


def _autogroup() -> str:
    try:
        return f" ({_AUTOGROUP.read_text().strip()})"
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="compared with one worker")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--sizes", default="4KiB,4MiB")
    parser.add_argument("--inflight", type=int, default=32, help="commands in flight per client")
    parser.add_argument(
        "--client",
        choices=("lean", "routed"),
        default="lean",
        help="client processes: bench.loadgen (lean) or RoutedKVClient (routed)",
    )
    parser.add_argument(
        "--queues", type=int, help="I/O queues per worker per client (lean 1, routed 2)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell")
    parser.add_argument("--gap", type=float, default=1.0, help="pause between cells")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--capacity", default="8GiB")
    parser.add_argument("--json", metavar="PATH", help="also write the runs here")
    parser.add_argument(
        "--nice",
        type=int,
        help="run the target and the clients at this niceness, their session's autogroup too"
        " (negative needs root): on a shared machine, keeps other work off their cores",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin each target worker (the one process of --workers 1) to a core of its own",
    )
    parser.add_argument(
        "--poll-us",
        type=float,
        default=0.0,
        help="the target's (and routed clients') --poll-us; 0 by default here: the clients share"
        " the target's cores, and a worker polling for its next batch takes the CPU they need"
        " (x1.28/x1.19 instead of x1.66/x1.47 for 4 KiB puts/gets in a paired run at 200)",
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip measuring, after each run, how N CPU-bound processes scale on this machine",
    )
    parser.add_argument("--run-client", help=argparse.SUPPRESS)  # internal: be one client process
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.queues is None:
        args.queues = 1 if args.client == "lean" else 2
    if args.run_client:
        if args.client == "lean":
            print(json.dumps(_lean_client(args)))
        else:
            print(json.dumps(anyio.run(_client, args)))
        return 0
    old_group_nice = _renice(args.nice) if args.nice is not None else None
    try:
        return _compare(args)
    finally:
        if old_group_nice is not None:
            with contextlib.suppress(OSError):
                _AUTOGROUP.write_text(str(old_group_nice))


def _compare(args: argparse.Namespace) -> int:
    print(
        f"{os.cpu_count()} CPUs; {args.clients} {args.client} client processes,"
        f" {args.inflight} in flight each over {args.queues} queue(s) per worker;"
        f" niceness {os.getpriority(os.PRIO_PROCESS, 0)}{_autogroup()}; load {os.getloadavg()}"
    )
    print(
        "cores: busy during the cell, target+clients+other (everything else on the machine:"
        " other processes, the kernel's own threads); a comparison where other work took more"
        f" than the cores left spare + {DISTURBED_CORES} is marked disturbed"
    )
    runs: list[dict[int, dict[str, dict[str, float]]]] = []
    ceilings: list[float] = []
    for r in range(args.repeat):
        run = {n: _run(args, n) for n in (1, args.workers)}
        runs.append(run)
        ceilings.append(machine_ceiling(args.workers) if args.ceiling else float("nan"))
        print(f"run {r + 1}:")
        if args.ceiling:
            print(
                f"  machine: {args.workers} CPU-bound processes do x{ceilings[-1]:.2f}"
                " the work of one (the most N workers could reach here)"
            )
        for cell in run[1]:
            one, many = run[1][cell], run[args.workers][cell]
            print(
                f"  {_label(cell):>9}: 1 worker {one['ops_per_s']:9.0f} ops/s"
                f" {one['gb_per_s']:6.2f} GB/s ({one['target_cpu_s_per_gb']:.2f} cpu-s/GB,"
                f" {_cores(one)}) | {args.workers} workers"
                f" {many['ops_per_s']:9.0f} ops/s {many['gb_per_s']:6.2f} GB/s"
                f" ({many['target_cpu_s_per_gb']:.2f} cpu-s/GB, {_cores(many)})"
                f" | x{many['ops_per_s'] / one['ops_per_s']:.2f}"
                + ("" if _quiet(one, 1) and _quiet(many, args.workers) else "  (disturbed)")
            )
    print("ratio N workers / 1 worker over the runs (median [min..max]):")
    for cell in runs[0][1]:
        ratios = [run[args.workers][cell]["ops_per_s"] / run[1][cell]["ops_per_s"] for run in runs]
        line = (
            f"  {_label(cell):>9}: x{statistics.median(ratios):.2f}"
            f" [{min(ratios):.2f}..{max(ratios):.2f}]"
        )
        quiet = [
            run[args.workers][cell]["ops_per_s"] / run[1][cell]["ops_per_s"]
            for run in runs
            if _quiet(run[1][cell], 1) and _quiet(run[args.workers][cell], args.workers)
        ]
        if len(quiet) < len(ratios):
            line += f"; undisturbed runs only ({len(quiet)} of {len(ratios)})"
            if quiet:
                line += f": x{statistics.median(quiet):.2f} [{min(quiet):.2f}..{max(quiet):.2f}]"
        print(line)
    if args.ceiling:
        print(
            f"  machine: x{statistics.median(ceilings):.2f}"
            f" [{min(ceilings):.2f}..{max(ceilings):.2f}] for {args.workers} CPU-bound processes"
        )
    if args.json:
        out: list[dict[str, Any]] = []
        for run, ceiling in zip(runs, ceilings, strict=True):
            entry: dict[str, Any] = {str(k): v for k, v in run.items()}
            if args.ceiling:
                entry["machine_ceiling"] = ceiling
            out.append(entry)
        Path(args.json).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
