"""A file or raw block device opened for positioned I/O, with O_DIRECT where the filesystem allows.

O_DIRECT keeps a cache tier's traffic out of the page cache (it would otherwise double-cache values
the DRAM tier already holds and evict everything else on the host). It needs offset, length and
buffer address aligned to the logical block size; every buffer here comes from an anonymous mmap
(page aligned) and every I/O is whole ``ALIGN`` units. tmpfs refuses O_DIRECT (EINVAL at open), so
there the device falls back to buffered I/O, and says so in the log.

All methods block; the flash engine calls them from worker threads.
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import stat
import sys

from kvext.engine.record import ALIGN, align_up

log = logging.getLogger("kvext.engine.device")


class IOMode(enum.Enum):
    DIRECT = "direct"
    BUFFERED = "buffered"


def aligned_buffer(size: int) -> memoryview:
    """A zeroed, page-aligned writable buffer of ``size`` rounded up to ``ALIGN``."""
    return memoryview(mmap.mmap(-1, max(align_up(size), ALIGN)))


class AlignedBufferPool:
    """Page-aligned buffers for records, reused once nobody holds a view of them any more.

    A fresh mmap costs a page fault per 4 KiB on first touch (a new 4 MiB buffer took ~3.4 ms
    here, ten times its CRC), and every Store and every flash Retrieve needs one. Buffers are kept
    by exact length (a KV cache stores the same chunk sizes over and over); one is free again when
    the only references left are the pool's own, which a reference count tells: every view handed
    out (a value being sent, a record being written in a worker thread) holds one. Contents are
    not cleared: callers overwrite what they use.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.tracked_bytes = 0
        self.reused = 0
        self._by_length: dict[int, list[mmap.mmap]] = {}

    def take(self, size: int) -> memoryview:
        length = max(align_up(size), ALIGN)
        buffers = self._by_length.setdefault(length, [])
        # A bounded scan: past 64, a new buffer is cheaper than looking. (Indexing, not
        # enumerate(): enumerate's cached result tuple would hold one more reference.)
        for i in range(min(len(buffers), 64)):
            buf = buffers[i]
            # References: the list, ``buf`` and getrefcount's argument; any view adds one.
            if sys.getrefcount(buf) <= 3:
                self.reused += 1
                return memoryview(buf)
        fresh = mmap.mmap(-1, length)
        if self.tracked_bytes + length <= self.max_bytes:
            buffers.append(fresh)
            self.tracked_bytes += length
        return memoryview(fresh)


class BlockDevice:
    """Positioned reads and writes of whole ``ALIGN`` units on one open file descriptor."""

    def __init__(self, path: str, fd: int, size: int, mode: IOMode, *, block_device: bool) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.mode = mode
        self.block_device = block_device

    @classmethod
    def open(
        cls, path: str, *, create_size: int | None = None, direct: bool | None = None
    ) -> BlockDevice:
        """Open ``path`` read-write; create (or grow) a regular file to ``create_size``.

        ``direct``: None tries O_DIRECT and falls back; False forces buffered I/O.
        Raises ``OSError`` (missing file without a size, permissions, ...).
        """
        exists = os.path.exists(path)
        if not exists and create_size is None:
            raise FileNotFoundError(errno.ENOENT, "no such file (give a size to create it)", path)
        flags = os.O_RDWR | (0 if exists else os.O_CREAT)
        fd = os.open(path, flags, 0o600)
        try:
            info = os.fstat(fd)
            block_device = stat.S_ISBLK(info.st_mode)
            if not block_device and not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "not a regular file or block device", path)
            if not block_device and create_size is not None and info.st_size < create_size:
                _preallocate(fd, create_size)
            size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        mode = IOMode.BUFFERED
        if direct is not False and hasattr(os, "O_DIRECT"):
            direct_fd = _open_direct(path)
            if direct_fd is not None:
                os.close(fd)
                fd, mode = direct_fd, IOMode.DIRECT
        log.info("%s: %d bytes, %s I/O", path, size, mode.value)
        return cls(path, fd, size, mode, block_device=block_device)

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; bytes past the end of a file read as zeros."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def write(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwritev(self.fd, [buf[done:]], offset + done)

    def sync(self) -> None:
        # fdatasync also flushes the drive's volatile write cache (a FLUSH to the device), which
        # O_DIRECT alone does not.
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _preallocate(fd: int, size: int) -> None:
    # Allocating every block up front means later O_DIRECT writes never change file metadata, so
    # fdatasync has only data to flush.
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _open_direct(path: str) -> int | None:
    """An O_DIRECT descriptor if the filesystem accepts one and an aligned read through it works."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    probe = aligned_buffer(ALIGN)
    try:
        os.preadv(fd, [probe], 0)
    except OSError:
        os.close(fd)
        return None
    return fd
