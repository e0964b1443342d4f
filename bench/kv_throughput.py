"""``gpucache bench``: put and get throughput and latency against a target, next to raw TCP.

For every value size and number of commands in flight, ``inflight`` worker tasks loop over one
shared ``KVClient`` (its I/O queues take the commands round robin), each timing every ``await``
with ``time.perf_counter``. Puts store one preallocated value; gets land in a preallocated buffer
per worker (``get(key, out=...)``, the zero-copy path) after the keys are stored. Each cell runs
for ``--seconds`` or until ``--max-bytes``/``--max-ops``, whichever comes first, with at least one
command per worker. Next to each cell, the same bytes go over a plain loopback socket between this
process and a child process (``bench.raw_tcp``) with as many messages outstanding: the bound a
Python NVMe/TCP path can hope for here, and each figure is printed as a ratio to it.

``--flash`` (off by default: it doubles the run and writes to disk) adds a second spawned target,
backed by a file under ``--flash-dir`` (``/tmp``; O_DIRECT where the filesystem takes it) with no
DRAM tier (``--dram 0``), so every get reads the device; the same cells run against it. Next to
them, a baseline (``bench.file_io``): the same values written with ``os.pwrite`` and read with
``os.preadv`` on a file in the same directory, opened the way the flash engine opens its device,
from as many threads as commands in flight. Both are printed, and flash as a ratio to the file.

``--compare`` adds the same cells against a redis-server it starts, through redis-py's asyncio
client. Each such cell runs interleaved with ours, in slices whose order swaps each round, since
the speed of a shared VM drifts within seconds and two cells timed one after the other would be
compared across that drift.

Nothing here judges the numbers; it measures and prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import attrs

from bench.file_io import FileBaseline
from bench.iperf import loopback_gb_per_s
from bench.raw_tcp import RawResult, RawServer, spawn_raw_server
from nvmeof.eventloop import run_options
from nvmeof.units import format_size, parse_size

if TYPE_CHECKING:
    from kvext.client import KVClient

log = logging.getLogger("gpucache.bench")

DEFAULT_SIZES = "4KiB,256KiB,4MiB,32MiB"
DEFAULT_INFLIGHT = "1,8,32"
DEFAULT_NQN = "nqn.2024-01.io.gpucache:kv0"  # the same as ``gpucache target``'s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"value sizes, comma separated ({DEFAULT_SIZES})"
    )
    parser.add_argument(
        "--inflight",
        default=DEFAULT_INFLIGHT,
        help=f"commands in flight, comma separated ({DEFAULT_INFLIGHT})",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per cell")
    parser.add_argument(
        "--raw-seconds",
        type=float,
        default=None,
        help="time budget per raw-TCP cell (default: half of --seconds)",
    )
    parser.add_argument(
        "--max-bytes", default="2GiB", help="stop a cell after this much data (default 2GiB)"
    )
    parser.add_argument(
        "--max-ops", type=int, default=200_000, help="stop a cell after this many commands"
    )
    parser.add_argument(
        "--queues",
        type=int,
        default=1,
        help="I/O queues (connections; default 1: a target process serves its queues from one"
        " thread; with more, small commands share the first queue with a free slot and large"
        " transfers go round robin)",
    )
    parser.add_argument(
        "--digests", action="store_true", help="header and data digests (CRC32C) on"
    )
    parser.add_argument(
        "-a", "--address", help="bench this running target (host:port) instead of spawning one"
    )
    parser.add_argument("-n", "--nqn", default=DEFAULT_NQN, help="subsystem NQN")
    parser.add_argument(
        "--capacity", default="8GiB", help="capacity of the spawned target (default 8GiB)"
    )
    parser.add_argument(
        "--max-value-size",
        default="64MiB",
        help="max value size of the spawned target (default 64MiB, raised to fit --sizes)",
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-TCP bound")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin: by default (2+ CPUs) the servers (our target, redis-server, the raw"
        " bound's child) run on the last CPU and this process (every client) on the others, as"
        " a storage node and its clients would; unpinned, loopback wake-ups make them share one",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run every cell against a redis-server it starts, through redis-py (asyncio)",
    )
    parser.add_argument(
        "--flash",
        action="store_true",
        help="also run every cell against a flash-backed target (a file under --flash-dir, no"
        " DRAM tier) and against os.pwrite/os.preadv on a file there (off by default)",
    )
    parser.add_argument(
        "--flash-dir",
        default="/tmp",
        help="where --flash puts its device and baseline files (default /tmp)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per command")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")


# --- settings and results ---------------------------------------------------------------------
def _size_list(text: str) -> list[int]:
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes needs sizes of at least 1 byte: {text!r}")
    return sizes


def _int_list(text: str, what: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"{what} needs positive integers: {text!r}")
    return values


def size_label(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B" if n < 1024 else format_size(n).replace(" ", "")


@attrs.frozen
class Settings:
    sizes: list[int]
    inflight: list[int]
    seconds: float
    raw_seconds: float
    max_bytes: int
    max_ops: int
    queues: int
    digests: bool
    timeout: float
    compare: bool = False
    flash: bool = False

    @property
    def pool(self) -> int:
        """Keys (and get buffers) per size: one per worker of the largest in-flight count."""
        return max(self.inflight)

    def op_cap(self, size: int) -> int:
        return max(1, min(self.max_ops, self.max_bytes // size))


@attrs.frozen
class Stats:
    ops: int
    seconds: float
    p50: float
    p99: float

    @classmethod
    def of(cls, ops: int, seconds: float, latencies: list[float]) -> Stats:
        ordered = sorted(latencies)
        return cls(ops, seconds, _percentile(ordered, 0.50), _percentile(ordered, 0.99))

    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def gb_per_s(self, size: int) -> float:
        return self.ops * size / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``ordered``."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@attrs.frozen
class Cell:
    op: str
    size: int
    inflight: int
    kv: Stats
    raw: Stats | None
    redis: Stats | None = None
    flash: Stats | None = None  # the flash-backed target
    file: Stats | None = None  # os.pwrite / os.preadv on a file
    iperf3: float | None = None  # GB/s of one iperf3 stream over loopback, next to this size

    @property
    def iperf3_ratio(self) -> float | None:
        if not self.iperf3:
            return None
        return self.kv.gb_per_s(self.size) / self.iperf3

    @property
    def file_ratio(self) -> float | None:
        if self.flash is None or self.file is None:
            return None
        theirs = self.file.gb_per_s(self.size)
        return self.flash.gb_per_s(self.size) / theirs if theirs > 0 else None

    @property
    def ratio(self) -> float | None:
        if self.raw is None:
            return None
        raw = self.raw.gb_per_s(self.size)
        return self.kv.gb_per_s(self.size) / raw if raw > 0 else None

    @property
    def redis_ratio(self) -> float | None:
        if self.redis is None:
            return None
        theirs = self.redis.ops_per_s()
        return self.kv.ops_per_s() / theirs if theirs > 0 else None

    def to_json(self) -> dict[str, Any]:
        def stats(s: Stats | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {
                "ops": s.ops,
                "seconds": s.seconds,
                "ops_per_s": s.ops_per_s(),
                "gb_per_s": s.gb_per_s(self.size),
                "p50_ms": s.p50 * 1e3,
                "p99_ms": s.p99 * 1e3,
            }

        return {
            "op": self.op,
            "size": self.size,
            "size_label": size_label(self.size),
            "inflight": self.inflight,
            "kv": stats(self.kv),
            "raw_tcp": stats(self.raw),
            "ratio_to_raw": self.ratio,
            "iperf3_gb_per_s": self.iperf3,
            "ratio_to_iperf3": self.iperf3_ratio,
            "redis_py": stats(self.redis),
            "ratio_to_redis_py": self.redis_ratio,
            "flash": stats(self.flash),
            "file": stats(self.file),
            "ratio_flash_to_file": self.file_ratio,
        }


@attrs.define
class _Budget:
    """Commands a cell may still start: until the deadline or the cap, at least ``min_ops``."""

    deadline: float
    max_ops: int
    min_ops: int
    started: int = 0

    def take(self) -> bool:
        if self.started >= self.min_ops and (
            self.started >= self.max_ops or time.perf_counter() >= self.deadline
        ):
            return False
        self.started += 1
        return True


# --- the measurements -------------------------------------------------------------------------
# Slices per side of a cell run against a baseline (``_paired_cells``).
_SLICES = 4
_ROUNDS_PER_SLICE = 8


async def _kv_cell(
    inflight: int,
    keys: Sequence[bytes],
    seconds: float,
    max_ops: int,
    op: Callable[[int, bytes], Any],
) -> Stats:
    """Run ``op(worker, key)`` from ``inflight`` workers; each worker owns keys w, w+n, ..."""
    return _Samples().add(await _kv_slice(inflight, keys, seconds, max_ops, op)).stats()


@attrs.define
class _Samples:
    """Slices of one cell, merged: their commands, their time and every latency."""

    ops: int = 0
    seconds: float = 0.0
    latencies: list[float] = attrs.Factory(list)

    def add(self, other: _Samples) -> _Samples:
        self.ops += other.ops
        self.seconds += other.seconds
        self.latencies += other.latencies
        return self

    def stats(self) -> Stats:
        return Stats.of(self.ops, self.seconds, self.latencies)


async def _kv_slice(
    inflight: int,
    keys: Sequence[bytes],
    seconds: float,
    max_ops: int,
    op: Callable[[int, bytes], Any],
) -> _Samples:
    latencies: list[float] = []
    start = time.perf_counter()
    end = start
    budget = _Budget(start + seconds, max_ops, inflight)

    async def worker(w: int) -> None:
        nonlocal end
        mine = keys[w::inflight]
        i = 0
        while budget.take():
            key = mine[i % len(mine)]
            i += 1
            t0 = time.perf_counter()
            await op(w, key)
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            end = max(end, t1)

    async with anyio.create_task_group() as tg:
        for w in range(inflight):
            tg.start_soon(worker, w)
    return _Samples(len(latencies), end - start, latencies)


async def _paired_cells(
    inflight: int,
    keys: Sequence[bytes],
    seconds: float,
    max_ops: int,
    ours: Callable[[int, bytes], Any],
    theirs: Callable[[int, bytes], Any],
    after_theirs: Callable[[], Awaitable[None]],
) -> tuple[Stats, Stats]:
    """Our cell and the baseline's, interleaved in slices (theirs, ours, ours, theirs, ...).

    The speed of these machines drifts by 2-3x from one second to the next; two cells run one
    after the other can land in different weather, and their ratio then says more about the
    weather than about the code. Alternating short slices, in an order that swaps each round,
    gives both the same mix of it. ``after_theirs`` runs after each baseline slice, untimed.
    """
    # A slice ends with its slowest command (the drain at the end of a window of ``inflight``):
    # each slice gets at least _ROUNDS_PER_SLICE windows of commands, so few large values
    # (32 MiB: 64 to a cell) run as one slice rather than as four of two windows each.
    slices = max(1, min(_SLICES, max_ops // (max(inflight, 1) * _ROUNDS_PER_SLICE)))
    mine, other = _Samples(), _Samples()
    sides = [(theirs, other), (ours, mine)]
    for round_ in range(slices):
        for op, samples in sides if round_ % 2 == 0 else sides[::-1]:
            samples.add(await _kv_slice(inflight, keys, seconds / slices, max_ops // slices, op))
            if samples is other:
                await after_theirs()
    return mine.stats(), other.stats()


def _raw_stats(result: RawResult) -> Stats:
    return Stats.of(result.ops, result.seconds, result.latencies)


async def _bench(
    settings: Settings,
    address: tuple[str, int],
    nqn: str,
    raw: RawServer | None,
    report: Callable[[Cell], None],
    redis_address: tuple[str, int] | None = None,
    flash: FlashPeer | None = None,
) -> list[Cell]:
    cells: list[Cell] = []
    async with contextlib.AsyncExitStack() as stack:
        kv = await stack.enter_async_context(_connect(settings, address, nqn))
        flash_kv = None
        if flash is not None:
            flash_kv = await stack.enter_async_context(_connect(settings, flash.address, nqn))
        redis = None
        if redis_address is not None:
            from bench.redis_peer import redis_client

            redis = redis_client(redis_address, max(settings.inflight))
        try:
            for size in settings.sizes:
                cells += await _bench_size(
                    kv,
                    settings,
                    size,
                    raw,
                    report,
                    redis,
                    None if flash is None or flash_kv is None else (flash_kv, flash.baseline),
                )
        finally:
            if redis is not None:
                await redis.aclose()
                await redis.connection_pool.disconnect()
    return cells


@contextlib.asynccontextmanager
async def _connect(
    settings: Settings, address: tuple[str, int], nqn: str
) -> AsyncIterator[KVClient]:
    from kvext.client import KVClient

    async with KVClient.connect(
        address,
        nqn,
        io_queues=settings.queues,
        queue_depth=max(settings.inflight),
        header_digest=settings.digests,
        data_digest=settings.digests,
    ) as kv:
        kv.timeout = settings.timeout
        queues = len(kv.controller.io_queues)
        if queues != settings.queues:
            log.warning("asked for %d I/O queues, the target gave %d", settings.queues, queues)
        yield kv


async def _refill(kv: KVClient, keys: Sequence[bytes], value: bytes) -> None:
    """Store ``value`` under the keys the target lacks (never stored, or evicted since)."""
    missing = [k for k in keys if not await kv.exists(k)]
    await kv.put_many((k, value) for k in missing)


async def _bench_size(
    kv: KVClient,
    settings: Settings,
    size: int,
    raw: RawServer | None,
    report: Callable[[Cell], None],
    redis: Any = None,
    flash: tuple[KVClient, FileBaseline] | None = None,
) -> list[Cell]:
    """The put cells, then the get cells, of one value size; its keys are deleted after."""
    cells: list[Cell] = []
    value = os.urandom(size)
    keys = [f"bench-{size}-{i}".encode() for i in range(settings.pool)]
    # One buffer per worker, reused by every cell of this size (and by the raw bound).
    buffers = [bytearray(size) for _ in range(settings.pool)]
    cap = settings.op_cap(size)

    async def put(w: int, key: bytes) -> None:
        await kv.put(key, value)

    async def get(w: int, key: bytes) -> None:
        await kv.get(key, out=buffers[w])

    flash_kv, baseline = (None, None) if flash is None else flash

    async def flash_put(w: int, key: bytes) -> None:
        assert flash_kv is not None
        await flash_kv.put(key, value)

    async def flash_get(w: int, key: bytes) -> None:
        assert flash_kv is not None
        await flash_kv.get(key, out=buffers[w])

    flash_ops = {"put": flash_put, "get": flash_get}

    async def redis_put(w: int, key: bytes) -> None:
        await redis.set(key, value)

    async def redis_get(w: int, key: bytes) -> None:
        # redis-py returns new bytes; a cache user then copies them into the tensor that needs them.
        data = await redis.get(key)
        buffers[w][:] = data

    redis_ops = {"put": redis_put, "get": redis_get}

    # The single-stream loopback bound, measured next to this size's cells (figures drift
    # between time windows here, so each size gets its own).
    iperf3 = None if raw is None else await anyio.to_thread.run_sync(loopback_gb_per_s, 1.0)
    for phase, op in (("put", put), ("get", get)):
        # Every key holds a value of this size before a cell: a put then replaces one, as in a
        # cache at capacity, rather than timing the first touch of fresh memory (which on these
        # VMs, after a size's gigabytes were freed, cost 32 MiB puts 10x, ours and redis's).
        await _refill(kv, keys, value)
        if flash_kv is not None and baseline is not None:
            await _refill(flash_kv, keys, value)
            if phase == "get":
                await anyio.to_thread.run_sync(baseline.fill, value)
        if redis is not None and phase == "put":
            await _redis_fill(redis, keys, value)
            await _purge(redis)
        for n in settings.inflight:
            raw_stats: Stats | None = None
            if raw is not None:
                if phase == "put":
                    result = await anyio.to_thread.run_sync(
                        raw.run_put, memoryview(value), n, settings.raw_seconds, cap
                    )
                else:
                    result = await anyio.to_thread.run_sync(
                        raw.run_get, buffers, n, settings.raw_seconds, cap
                    )
                raw_stats = _raw_stats(result)
            redis_stats: Stats | None = None
            if redis is not None:
                if phase == "get":
                    await _redis_fill(redis, keys, value)
                kv_stats, redis_stats = await _paired_cells(
                    n, keys, settings.seconds, cap, op, redis_ops[phase], partial(_purge, redis)
                )
            else:
                kv_stats = await _kv_cell(n, keys, settings.seconds, cap, op)
            flash_stats: Stats | None = None
            file_stats: Stats | None = None
            if flash_kv is not None and baseline is not None:
                flash_stats = await _kv_cell(n, keys, settings.seconds, cap, flash_ops[phase])
                if phase == "put":
                    result = await anyio.to_thread.run_sync(
                        baseline.run_put, value, n, settings.seconds, cap
                    )
                else:
                    result = await anyio.to_thread.run_sync(
                        baseline.run_get, size, n, settings.seconds, cap
                    )
                file_stats = _raw_stats(result)
            cell = Cell(
                phase, size, n, kv_stats, raw_stats, redis_stats, flash_stats, file_stats, iperf3
            )
            cells.append(cell)
            report(cell)
    for key in keys:
        await kv.delete(key)
        if flash_kv is not None:
            await flash_kv.delete(key)
    if redis is not None:
        await redis.flushall()
        await _purge(redis)
    return cells


async def _redis_fill(redis: Any, keys: Sequence[bytes], value: bytes) -> None:
    """Every key holds ``value`` on the redis-server (as ``_refill`` makes it on our target)."""
    for k in keys:
        await redis.set(k, value)


async def _purge(redis: Any) -> None:
    """Have redis-server hand freed memory back now. It shares the servers' CPU with our target,
    and jemalloc's background thread otherwise purges the values a cell overwrote (gigabytes after
    a flush) while our next cell runs: 32 MiB puts measured 9 instead of 75 ops/s that way."""
    with contextlib.suppress(Exception):  # MEMORY PURGE is jemalloc's; other builds refuse it
        await redis.memory_purge()


# --- output -----------------------------------------------------------------------------------
COLUMNS = (
    ("op", "<"),
    ("size", ">"),
    ("inflight", ">"),
    ("ops", ">"),
    ("ops/s", ">"),
    ("GB/s", ">"),
    ("p50 ms", ">"),
    ("p99 ms", ">"),
    ("raw GB/s", ">"),
    ("raw p50 ms", ">"),
    ("vs raw", ">"),
    ("iperf3 GB/s", ">"),
    ("vs iperf3", ">"),
)
COMPARE_COLUMNS = (("redis-py ops/s", ">"), ("vs redis-py", ">"))
FLASH_COLUMNS = (("flash GB/s", ">"), ("flash p50 ms", ">"), ("file GB/s", ">"), ("vs file", ">"))


def _row(cell: Cell, *, compare: bool = False, flash: bool = False) -> list[str]:
    kv, raw, ratio = cell.kv, cell.raw, cell.ratio
    row = [
        cell.op,
        size_label(cell.size),
        str(cell.inflight),
        str(kv.ops),
        f"{kv.ops_per_s():.1f}",
        f"{kv.gb_per_s(cell.size):.3f}",
        f"{kv.p50 * 1e3:.3f}",
        f"{kv.p99 * 1e3:.3f}",
        "-" if raw is None else f"{raw.gb_per_s(cell.size):.3f}",
        "-" if raw is None else f"{raw.p50 * 1e3:.3f}",
        "-" if ratio is None else f"{ratio:.2f}x",
        "-" if cell.iperf3 is None else f"{cell.iperf3:.3f}",
        "-" if cell.iperf3_ratio is None else f"{cell.iperf3_ratio:.2f}x",
    ]
    if compare:
        row += [
            "-" if cell.redis is None else f"{cell.redis.ops_per_s():.1f}",
            "-" if cell.redis_ratio is None else f"{cell.redis_ratio:.2f}x",
        ]
    if flash:
        row += [
            "-" if cell.flash is None else f"{cell.flash.gb_per_s(cell.size):.3f}",
            "-" if cell.flash is None else f"{cell.flash.p50 * 1e3:.3f}",
            "-" if cell.file is None else f"{cell.file.gb_per_s(cell.size):.3f}",
            "-" if cell.file_ratio is None else f"{cell.file_ratio:.2f}x",
        ]
    return row


def format_table(cells: Sequence[Cell]) -> str:
    compare = any(c.redis is not None for c in cells)
    flash = any(c.flash is not None for c in cells)
    columns = COLUMNS + (COMPARE_COLUMNS if compare else ()) + (FLASH_COLUMNS if flash else ())
    rows = [
        [name for name, _ in columns],
        *(_row(c, compare=compare, flash=flash) for c in cells),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = []
    for j, r in enumerate(rows):
        parts = [f"{v:{align}{w}}" for v, (_, align), w in zip(r, columns, widths, strict=True)]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- the flash target and its baseline ------------------------------------------------------
@attrs.frozen
class FlashPeer:
    address: tuple[str, int]
    device: str
    device_size: int
    baseline: FileBaseline


def flash_device_size(settings: Settings, max_value: int) -> int:
    """A device on which every key of the largest size stays live twice over: the put cells
    rewrite them, and eviction recycles whole regions, oldest first."""
    from kvext.engine.record import ALIGN, record_length
    from kvext.engine.region import checkpoint_size, region_size_for

    region = region_size_for(max_value)
    usable = region - ALIGN
    working_set = settings.pool * record_length(max(settings.sizes) + (64 << 10))
    regions = 2 * -(-working_set // usable) + 3
    size = ALIGN + checkpoint_size(regions, region) + regions * region
    return -(-size // (1 << 20)) << 20


@contextlib.contextmanager
def spawn_flash_peer(settings: Settings, directory: str, nqn: str) -> Iterator[FlashPeer]:
    """A ``gpucache target --flash`` with ``--dram 0`` and a ``FileBaseline``, both in a
    temporary directory under ``directory`` that goes with them."""
    from nvmeof.testing import spawn_target

    max_value = max(settings.sizes) + (64 << 10)  # room for the client's framing header
    size = flash_device_size(settings, max_value)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="gpucache-bench-", dir=directory)
        )
        device = os.path.join(tmp, "flash.img")
        target_args = [
            "--flash", device, "--flash-size", str(size), "--dram", "0",
            "--max-value-size", str(max_value), "--no-discovery",
            "-r", os.path.join(tmp, "rpc.sock"),
        ]  # fmt: skip
        target = stack.enter_context(spawn_target(*target_args, nqn=nqn))
        baseline = FileBaseline(
            os.path.join(tmp, "file.img"), slots=settings.pool, max_size=max(settings.sizes)
        )
        stack.callback(baseline.close)
        yield FlashPeer(target.address, device, size, baseline)


def _first_cause(exc: BaseException) -> str:
    """The error itself, not "unhandled errors in a TaskGroup (31 sub-exceptions)"."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


# --- entry point ------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> Settings:
    if args.seconds <= 0:
        raise ValueError("--seconds must be positive")
    if args.queues < 1 or args.max_ops < 1:
        raise ValueError("--queues and --max-ops must be at least 1")
    raw_seconds = args.raw_seconds if args.raw_seconds is not None else args.seconds / 2
    return Settings(
        sizes=_size_list(args.sizes),
        inflight=_int_list(args.inflight, "--inflight"),
        seconds=args.seconds,
        raw_seconds=raw_seconds,
        max_bytes=parse_size(args.max_bytes),
        max_ops=args.max_ops,
        queues=args.queues,
        digests=args.digests,
        timeout=args.timeout,
        compare=args.compare,
        flash=args.flash,
    )


def main(args: argparse.Namespace) -> int:
    from nvmeof.errors import NvmeofError
    from nvmeof.initiator.controller import parse_address
    from nvmeof.testing import spawn_target

    try:
        settings = _settings(args)
        if settings.compare and args.backend != "asyncio":
            raise ValueError("--compare runs redis-py's asyncio client: use --backend asyncio")
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    wall = time.perf_counter()
    own = os.sched_getaffinity(0)
    server_cpus: set[int] | None = None
    if not args.no_pin and len(own) >= 2:
        server_cpus = {max(own)}
        os.sched_setaffinity(0, own - server_cpus)
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(os.sched_setaffinity, 0, own)
            if args.address:
                address = parse_address(args.address)
                where = f"target at {address[0]}:{address[1]}"
            else:
                max_value = max(parse_size(args.max_value_size), max(settings.sizes) + (1 << 20))
                pin = [] if server_cpus is None else ["--cpumask", f"[{max(server_cpus)}]"]
                target = stack.enter_context(
                    spawn_target(
                        "--capacity",
                        args.capacity,
                        "--max-value-size",
                        str(max_value),
                        *pin,
                        nqn=args.nqn,
                    )
                )
                address = target.address
                where = f"spawned target (capacity {args.capacity}) on {address[0]}:{address[1]}"
            raw = None if args.no_raw else stack.enter_context(spawn_raw_server(cpus=server_cpus))
            redis_address = None
            if settings.compare:
                from bench.redis_peer import spawn_redis

                redis_address = stack.enter_context(spawn_redis(cpus=server_cpus))
            flash = None
            if settings.flash:
                flash = stack.enter_context(spawn_flash_peer(settings, args.flash_dir, args.nqn))
            print(
                f"gpucache bench: {where}, {args.nqn}; {settings.queues} I/O queues, digests "
                f"{'on' if settings.digests else 'off'}, backend {args.backend}; "
                f"{settings.seconds:g} s per cell, raw TCP {settings.raw_seconds:g} s per cell; "
                + (
                    "not pinned"
                    if server_cpus is None
                    else f"servers on CPU {max(server_cpus)}, clients on CPUs"
                    f" {sorted(own - server_cpus)}"
                ),
                flush=True,
            )
            if flash is not None:
                print(
                    f"flash: spawned target on {flash.address[0]}:{flash.address[1]} backed by"
                    f" {flash.device} ({format_size(flash.device_size)}, no DRAM tier); file"
                    f" baseline {flash.baseline.path} ({flash.baseline.mode.value} I/O)",
                    flush=True,
                )

            total = len(settings.sizes) * len(settings.inflight) * 2
            done = 0

            def report(cell: Cell) -> None:
                nonlocal done
                done += 1
                bar = "#" * (20 * done // total)
                print(
                    f"\r[{bar:<20}] {done}/{total} {cell.op} {size_label(cell.size)}"
                    f" x{cell.inflight}   ",
                    end="" if done < total else "\n",
                    file=sys.stderr,
                    flush=True,
                )
                log.debug(
                    "%s", " ".join(_row(cell, compare=settings.compare, flash=settings.flash))
                )

            cells = anyio.run(
                _bench,
                settings,
                address,
                args.nqn,
                raw,
                report,
                redis_address,
                flash,
                **run_options(args.backend),
            )
    except (NvmeofError, OSError, RuntimeError, TimeoutError, ExceptionGroup) as exc:
        log.error("bench failed: %s", _first_cause(exc))
        return 1
    wall = time.perf_counter() - wall
    print()
    print(format_table(cells))
    print()
    print(
        "GB/s = 1e9 bytes/s of value data; latency per command, perf_counter around each await;"
        " raw = plain Python loopback socket to a child process, recv_into a preallocated buffer,"
        " same size and in-flight; vs raw = KV GB/s / raw GB/s. iperf3 = one iperf3 TCP stream"
        " over loopback (C on both ends), measured next to each value size; vs iperf3 = KV GB/s"
        " / iperf3 GB/s."
    )
    if settings.compare:
        print(
            "redis-py = the same cells against redis-server (no persistence) through redis-py's"
            " asyncio client with hiredis, gets copied into the same buffers, each cell"
            " interleaved with ours in slices (theirs, ours, ours, theirs...) so both see the"
            " same machine; vs redis-py = our ops/s / theirs."
        )
    if settings.flash:
        print(
            "flash = the same cells against a second target on a file (--flash-dir), no DRAM"
            " tier, so every get reads the device; file = the same values with os.pwrite /"
            " os.preadv on a file there, one thread per command in flight, O_DIRECT when the"
            " engine would use it; vs file = flash GB/s / file GB/s."
        )
    print(f"total wall time {wall:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "settings": attrs.asdict(settings),
                    "address": list(address),
                    "nqn": args.nqn,
                    "backend": args.backend,
                    "wall_seconds": wall,
                    "cells": [c.to_json() for c in cells],
                },
                f,
                indent=2,
            )
            f.write("\n")
    return 0
