"""The comparison users ask for: the same workload against Redis through redis-py (hiredis).

LMCache users mostly run Redis through redis-py today, so `gpucache bench --compare` starts
Debian's redis-server (persistence off) and runs every cell against it too, in the same run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the bench's servers bind it at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def spawn_redis(max_memory: str = "8gb", cpus: set[int] | None = None) -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on loopback: no persistence, no eviction surprises; on ``cpus``
    when given (the bench puts it where it puts our target)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--dir", tmp,
                "--maxmemory", max_memory, "--proto-max-bulk-len", "512mb",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if cpus:
                os.sched_setaffinity(proc.pid, cpus)
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
            yield "127.0.0.1", port
        finally:
            proc.terminate()
            proc.wait(10)


def redis_client(address: tuple[str, int], connections: int) -> Any:
    """An asyncio redis-py client (hiredis parser when installed) with enough connections."""
    import redis.asyncio

    # 32 x 32 MiB in flight through one single-threaded server takes seconds per command: give
    # reads as long as the bench gives ours (redis-py's default timed out here).
    pool = redis.asyncio.BlockingConnectionPool(
        host=address[0],
        port=address[1],
        max_connections=connections,
        timeout=120,
        socket_timeout=120,
    )
    return redis.asyncio.Redis(connection_pool=pool)
