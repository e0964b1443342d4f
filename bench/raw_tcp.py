"""A raw-TCP bound for the KV benchmark: the same bytes over a plain loopback socket, in Python.

The receiving end of a put (and the sending end of a get) runs in a child process, as the target
does. ``put`` mode: the bench sends each value whole and the server ``recv_into``s it into one
preallocated buffer, then answers one byte (the "completion"). ``get`` mode: the bench sends one
byte per request and the server answers each with the value, which the bench ``recv_into``s into a
preallocated buffer. Up to ``inflight`` messages are outstanding at once, as with KV commands, so
each (op, size, in-flight) cell has a bound measured the same way: throughput and per-message
latency from send to completion. Sockets are tuned like the NVMe/TCP transport's (TCP_NODELAY,
4 MiB socket buffers). Run ``python -m bench.raw_tcp`` to start a server; it prints ``PORT <n>``.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import attrs

_HELLO = struct.Struct("!cQ")  # mode (b"P" put / b"G" get), value size
_SOCKET_BUFFER = 4 * 1024 * 1024


def tune(sock: socket.socket) -> None:
    """As the NVMe/TCP transport tunes its sockets (nvmeof.transport.sockets), blocking."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False if the peer closed first."""
    got, size = 0, len(view)
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            return False
        got += n
    return True


# --- server (child process) -------------------------------------------------------------------
def _serve_put(conn: socket.socket, size: int) -> None:
    view = memoryview(bytearray(size))
    while _recv_exact(conn, view):
        conn.sendall(b"A")


def _serve_get(conn: socket.socket, size: int) -> None:
    payload = memoryview(bytes(size))
    requests = bytearray(4096)
    while True:
        n = conn.recv_into(requests)
        if n == 0:
            return
        for _ in range(n):
            conn.sendall(payload)


def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(8)
        print(f"PORT {listener.getsockname()[1]}", flush=True)
        while True:
            conn, _ = listener.accept()
            with conn:
                tune(conn)
                hello = memoryview(bytearray(_HELLO.size))
                if not _recv_exact(conn, hello):
                    continue
                mode, size = _HELLO.unpack(hello)
                with suppress(OSError):  # OSError: the bench went away mid-cell
                    (_serve_put if mode == b"P" else _serve_get)(conn, size)


# --- client (bench process) -------------------------------------------------------------------
@attrs.frozen
class RawResult:
    ops: int
    seconds: float
    latencies: list[float]  # seconds per message, send to completion


@attrs.define
class _Budget:
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


class RawServer:
    """A running ``python -m bench.raw_tcp`` child process."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int) -> None:
        self.process = process
        self.address = (host, port)

    def _connect(self, mode: bytes, size: int) -> socket.socket:
        sock = socket.create_connection(self.address)
        tune(sock)
        sock.sendall(_HELLO.pack(mode, size))
        return sock

    def run_put(
        self, payload: memoryview, inflight: int, seconds: float, max_ops: int
    ) -> RawResult:
        """Send ``payload`` whole, again and again, with up to ``inflight`` unacknowledged."""
        size = len(payload)
        latencies: list[float] = []
        acks = bytearray(4096)
        with self._connect(b"P", size) as sock:
            start = time.perf_counter()
            budget = _Budget(start + seconds, max_ops, inflight)
            outstanding: collections.deque[float] = collections.deque()
            end = start
            while True:
                while len(outstanding) < inflight and budget.take():
                    outstanding.append(time.perf_counter())
                    sock.sendall(payload)
                if not outstanding:
                    break
                n = sock.recv_into(acks)
                if n == 0:
                    raise ConnectionError("raw TCP server closed the connection")
                end = time.perf_counter()
                for _ in range(n):
                    latencies.append(end - outstanding.popleft())
        return RawResult(len(latencies), end - start, latencies)

    def run_get(
        self, buffers: Sequence[bytearray], inflight: int, seconds: float, max_ops: int
    ) -> RawResult:
        """Request the value, ``inflight`` requests outstanding, into ``buffers`` in turn."""
        size = len(buffers[0])
        views = [memoryview(b) for b in buffers[:inflight]]
        latencies: list[float] = []
        with self._connect(b"G", size) as sock:
            start = time.perf_counter()
            budget = _Budget(start + seconds, max_ops, inflight)
            outstanding: collections.deque[float] = collections.deque()
            end = start
            done = 0
            while True:
                issued = 0
                while len(outstanding) < inflight and budget.take():
                    outstanding.append(time.perf_counter())
                    issued += 1
                if issued:
                    sock.sendall(b"R" * issued)
                if not outstanding:
                    break
                if not _recv_exact(sock, views[done % len(views)]):
                    raise ConnectionError("raw TCP server closed the connection")
                end = time.perf_counter()
                latencies.append(end - outstanding.popleft())
                done += 1
        return RawResult(len(latencies), end - start, latencies)


@contextmanager
def spawn_raw_server(host: str = "127.0.0.1", cpus: set[int] | None = None) -> Iterator[RawServer]:
    """Run the raw-TCP server in a child process on a free loopback port (on ``cpus``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.raw_tcp", "--host", host], stdout=subprocess.PIPE
    )
    try:
        if cpus:
            os.sched_setaffinity(proc.pid, cpus)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "PORT":
            raise RuntimeError(f"raw TCP server did not start (rc={proc.poll()})")
        yield RawServer(proc, host, int(line[1]))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="raw-TCP bound server for gpucache bench")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with suppress(KeyboardInterrupt):
        serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
