"""Reusable value buffers.

Fresh memory costs a page fault per 4 KiB on first touch (on the VMs here, 32 MiB of fresh
memory took ~20 ms to fill against ~4 ms for memory already mapped), and a cache at capacity frees
a value for every one it stores. So buffers of evicted, deleted or overwritten values go back to a
small pool, by size class, and the next Store of a similar size lands in memory already mapped.
"""

from __future__ import annotations

import attrs

MIN_POOLED = 256 * 1024  # smaller buffers come cheaply from the allocator's own free lists


def size_class(size: int) -> int:
    """``size`` rounded up to one of eight steps per power of two (at most 12.5 % slack)."""
    if size <= MIN_POOLED:
        return size
    step = 1 << max(size.bit_length() - 4, 0)
    return -(-size // step) * step


@attrs.define
class PoolStats:
    reused: int = 0
    allocated: int = 0
    returned: int = 0
    dropped: int = 0


class BufferPool:
    """Free buffers by size class, holding at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free_bytes = 0
        self.stats = PoolStats()
        self._free: dict[int, list[bytearray]] = {}

    def take(self, size: int) -> bytearray:
        """A buffer of ``size_class(size)`` bytes; its contents are whatever was there before."""
        cls = size_class(size)
        free = self._free.get(cls)
        if free:
            buf = free.pop()
            self.free_bytes -= len(buf)
            self.stats.reused += 1
            return buf
        self.stats.allocated += 1
        return bytearray(cls)

    def give(self, buf: bytearray) -> None:
        """Return a buffer nobody else references any more."""
        if len(buf) <= MIN_POOLED or self.free_bytes + len(buf) > self.max_bytes:
            self.stats.dropped += 1
            return
        self._free.setdefault(len(buf), []).append(buf)
        self.free_bytes += len(buf)
        self.stats.returned += 1

    def clear(self) -> None:
        self._free.clear()
        self.free_bytes = 0
