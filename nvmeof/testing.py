"""Helpers for tests and benchmarks: a target in this process, or in a child process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import attrs

from nvmeof.target.bdev.base import Bdev
from nvmeof.target.server import TargetServer
from nvmeof.target.subsystem import Subsystem, Target, TargetLimits, transfer_size_for

TEST_NQN = "nqn.2024-01.io.gpucache:test"


@attrs.frozen
class RunningTarget:
    host: str
    port: int
    nqn: str
    target: Target | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def make_kv_target(
    *,
    nqn: str = TEST_NQN,
    capacity: int = 1 << 30,
    max_value_length: int = 64 << 20,
    eviction: str = "lru",
    limits: TargetLimits | None = None,
    hosts: Sequence[str] = (),
) -> Target:
    from kvext.engine.base import EngineLimits
    from kvext.engine.memory import MemoryEngine
    from kvext.namespace import KeyValueNamespace

    target = Target(limits or TargetLimits(max_transfer_size=transfer_size_for(max_value_length)))
    subsystem = Subsystem(nqn=nqn, allow_any_host=not hosts, hosts=set(hosts))
    engine = MemoryEngine(
        EngineLimits(capacity_bytes=capacity, max_value_length=max_value_length), policy=eviction
    )
    subsystem.add_namespace(KeyValueNamespace(engine))
    target.add_subsystem(subsystem)
    return target


def make_block_target(
    bdevs: Sequence[Bdev] = (),
    *,
    nqn: str = TEST_NQN,
    num_blocks: int = 16384,
    block_size: int = 512,
    kv: bool = False,
    limits: TargetLimits | None = None,
    hosts: Sequence[str] = (),
) -> Target:
    """A target whose subsystem has a namespace per bdev (default: one malloc bdev,
    ``num_blocks`` x ``block_size``); with ``kv``, a DRAM KV namespace comes first, as nsid 1."""
    from nvmeof.target.bdev.malloc import MallocBdev

    if kv:
        target = make_kv_target(nqn=nqn, capacity=64 << 20, limits=limits, hosts=hosts)
        subsystem = target.subsystems[nqn]
    else:
        target = Target(limits or TargetLimits())
        subsystem = Subsystem(nqn=nqn, allow_any_host=not hosts, hosts=set(hosts))
        target.add_subsystem(subsystem)
    for bdev in bdevs or [MallocBdev("Malloc0", num_blocks, block_size)]:
        subsystem.add_namespace(bdev.make_namespace())
    return target


@contextlib.asynccontextmanager
async def serve_target(
    target: Target | None = None, *, host: str = "127.0.0.1", allow_digests: bool = True
) -> AsyncIterator[RunningTarget]:
    """Serve ``target`` (a fresh DRAM KV target by default) on a free loopback port."""
    target = target or make_kv_target()
    nqn = next(iter(target.subsystems))
    server = TargetServer(target, allow_digests=allow_digests)
    async with anyio.create_task_group() as tg:
        bound_host, port = await tg.start(server.serve, host, 0)
        try:
            yield RunningTarget(bound_host, port, nqn, target=target)
        finally:
            tg.cancel_scope.cancel()


@contextlib.contextmanager
def spawn_target(
    *args: str, nqn: str = TEST_NQN, startup_timeout: float = 30.0, log_path: Path | None = None
) -> Iterator[RunningTarget]:
    """Run ``gpucache target`` as a child process on a free loopback port."""
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        log_file = open(log_path or Path(tmp) / "target.log", "wb")  # noqa: SIM115
        cmd = [
            sys.executable, "-m", "nvmeof.cli", "target",
            "--listen", "127.0.0.1:0", "--nqn", nqn, "--ready-file", str(ready), *args,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ)
        try:
            deadline = time.monotonic() + startup_timeout
            while not ready.exists() or not ready.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_file.flush()
                    text = Path(log_file.name).read_text(errors="replace")
                    raise RuntimeError(f"target did not start (rc={proc.returncode}):\n{text}")
                time.sleep(0.05)
            host, _, port = ready.read_text().split()[0].rpartition(":")
            yield RunningTarget(host, int(port), nqn, process=proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log_file.close()
