"""The file baseline of ``gpucache bench --flash``: the same values written with ``os.pwrite`` and
read with ``os.preadv`` straight on a file, from as many threads as the cell has commands in
flight, with nothing in between (no protocol, no records, no index, no event loop).

The file is opened as the flash engine opens its device (``kvext.engine.device.BlockDevice``):
O_DIRECT where the filesystem takes it (tmpfs does not), buffered otherwise. Each value goes to a
slot of its own, one per key of the cell, from a page-aligned buffer, rounded up to whole 4 KiB
blocks as O_DIRECT requires (the engine rounds its records the same way); throughput counts the
value bytes only, as the KV columns do. Writes are not followed by fdatasync, as an acknowledged
Store is not either.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import attrs

from bench.raw_tcp import RawResult
from kvext.engine.device import BlockDevice, IOMode, aligned_buffer
from kvext.engine.record import align_up


@attrs.define
class _Budget:
    """``kv_throughput._Budget`` for threads: until the deadline or the cap, at least min_ops."""

    deadline: float
    max_ops: int
    min_ops: int
    started: int = 0
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def take(self) -> bool:
        with self.lock:
            if self.started >= self.min_ops and (
                self.started >= self.max_ops or time.perf_counter() >= self.deadline
            ):
                return False
            self.started += 1
            return True


class FileBaseline:
    """``slots`` slots of up to ``max_size`` bytes each in the file at ``path`` (created)."""

    def __init__(self, path: str, *, slots: int, max_size: int) -> None:
        self.path = path
        self.slots = slots
        self.stride = align_up(max_size)
        self.device = BlockDevice.open(path, create_size=self.stride * slots)

    @property
    def mode(self) -> IOMode:
        return self.device.mode

    def close(self) -> None:
        self.device.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def fill(self, value: bytes) -> None:
        """Write ``value`` to every slot (before the read cells; not timed)."""
        buf = self._buffer(value)
        for slot in range(self.slots):
            self._write(buf, slot)

    def run_put(self, value: bytes, inflight: int, seconds: float, max_ops: int) -> RawResult:
        buffers = [self._buffer(value) for _ in range(inflight)]
        return self._run(inflight, seconds, max_ops, lambda w, slot: self._write(buffers[w], slot))

    def run_get(self, size: int, inflight: int, seconds: float, max_ops: int) -> RawResult:
        buffers = [aligned_buffer(size) for _ in range(inflight)]
        return self._run(inflight, seconds, max_ops, lambda w, slot: self._read(buffers[w], slot))

    def _buffer(self, value: bytes) -> memoryview:
        buf = aligned_buffer(len(value))
        buf[: len(value)] = value
        return buf

    def _write(self, buf: memoryview, slot: int) -> None:
        offset = slot * self.stride
        done = 0
        while done < len(buf):
            done += os.pwrite(self.device.fd, buf[done:], offset + done)

    def _read(self, buf: memoryview, slot: int) -> None:
        offset = slot * self.stride
        done = 0
        while done < len(buf):
            n = os.preadv(self.device.fd, [buf[done:]], offset + done)
            if n == 0:
                raise EOFError(f"{self.path}: short read at {offset + done}")
            done += n

    def _run(
        self, inflight: int, seconds: float, max_ops: int, op: Callable[[int, int], None]
    ) -> RawResult:
        """``op(worker, slot)`` from ``inflight`` threads; worker w owns slots w, w+n, ..."""
        latencies: list[float] = []
        errors: list[BaseException] = []
        start = time.perf_counter()
        budget = _Budget(start + seconds, max_ops, inflight)
        ends = [start] * inflight

        def worker(w: int) -> None:
            mine = range(w, self.slots, inflight) or range(w % self.slots, w % self.slots + 1)
            i = 0
            try:
                while budget.take():
                    slot = mine[i % len(mine)]
                    i += 1
                    t0 = time.perf_counter()
                    op(w, slot)
                    t1 = time.perf_counter()
                    latencies.append(t1 - t0)
                    ends[w] = t1
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(inflight)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return RawResult(len(latencies), max(ends) - start, latencies)
