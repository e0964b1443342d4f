"""A file- or block-device-backed bdev (SPDK's ``bdev_aio_create``).

I/O is ``os.preadv``/``os.pwritev`` in worker threads (``anyio.to_thread``), so the event loop
never waits on the disk. The file is opened with O_DIRECT when the filesystem takes it for this
block size (checked by one aligned read at creation), else buffered; the choice is logged and shown
as ``io_mode``. O_DIRECT needs aligned memory: ``allocate`` gives page-aligned buffers (anonymous
mmap), and data in any other buffer is staged through one. Deallocate punches a hole in the file
where the filesystem can (``fallocate``), else writes zeros.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import mmap
import os
import uuid as uuid_mod
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from nvmeof.target.bdev.malloc import byte_view
from nvmeof.target.block import (
    BlockNamespace,
    check_block_size,
    check_io,
    describe_block_bdev,
)
from nvmeof.transport.base import Buffer

log = logging.getLogger("nvmeof.target.bdev.aio")

PRODUCT_NAME = "AIO disk"
ALIGNMENT = mmap.PAGESIZE  # memory alignment kept for O_DIRECT (covers any logical block size)
_ZERO_CHUNK = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

T = TypeVar("T")


class IoMode(enum.Enum):
    DIRECT = "O_DIRECT"
    BUFFERED = "buffered"


def aligned_buffer(length: int) -> memoryview:
    """``length`` zeroed bytes at a page-aligned address (freed with the last view of it)."""
    return memoryview(mmap.mmap(-1, max(length, 1)))[:length]


def _is_aligned(view: memoryview) -> bool:
    if view.readonly or not view.c_contiguous or len(view) == 0:
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return False
    return address % ALIGNMENT == 0


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"read at {offset} hit the end of the file")
        view = view[n:]
        offset += n


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwritev(fd, [view], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"write at {offset} made no progress")
        view = view[n:]
        offset += n


def _open(path: str, block_size: int) -> tuple[int, IoMode, str]:
    """Open read-write, O_DIRECT if an aligned read of one block works that way."""
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0)
    reason = "O_DIRECT is not available on this platform"
    if direct:
        try:
            fd = os.open(path, flags | direct)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            reason = f"the filesystem refuses O_DIRECT ({exc.strerror})"
        else:
            try:
                os.preadv(fd, [aligned_buffer(block_size)], 0)  # EINVAL: not for this alignment
                return fd, IoMode.DIRECT, ""
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EINVAL:
                    raise
                reason = f"O_DIRECT I/O of {block_size}-byte blocks fails ({exc.strerror})"
    return os.open(path, flags), IoMode.BUFFERED, reason


class AioBdev:
    """The blocks of an existing file (or block device); its size gives ``num_blocks``."""

    product_name = PRODUCT_NAME

    def __init__(
        self,
        name: str,
        filename: str,
        block_size: int = 512,
        uuid: uuid_mod.UUID | None = None,
    ) -> None:
        if not name:
            raise ValueError("a bdev needs a name")
        self.name = name
        self.filename = os.fspath(filename)
        self.block_size = check_block_size(block_size)
        self.uuid = uuid or uuid_mod.uuid4()
        self.claimed = False
        # Creation does blocking syscalls (open, one probe read), as SPDK's does; I/O never does.
        fd, self.io_mode, reason = _open(self.filename, block_size)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < block_size or size % block_size:
                raise ValueError(
                    f"{self.filename}: size {size} is not a non-zero multiple of the block size"
                    f" {block_size}"
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.num_blocks = size // block_size
        self._punch_holes = _fallocate is not None
        self._in_flight = 0
        self._idle: anyio.Event | None = None
        self._closing = False
        if self.io_mode is IoMode.DIRECT:
            log.info(
                "aio bdev %s on %s: %d blocks of %d bytes, O_DIRECT",
                name, self.filename, self.num_blocks, block_size,
            )  # fmt: skip
        else:
            log.info(
                "aio bdev %s on %s: %d blocks of %d bytes, buffered I/O: %s",
                name, self.filename, self.num_blocks, block_size, reason,
            )  # fmt: skip

    @property
    def direct(self) -> bool:
        return self.io_mode is IoMode.DIRECT

    def __repr__(self) -> str:
        return f"<AioBdev {self.name} {self.filename} {self.num_blocks}x{self.block_size}>"

    # --- the Bdev protocol --------------------------------------------------------------------
    def make_namespace(self) -> BlockNamespace:
        self.claimed = True
        return BlockNamespace(self)

    def describe(self) -> dict[str, object]:
        return describe_block_bdev(
            self,
            product_name=PRODUCT_NAME,
            claimed=self.claimed,
            driver_specific={
                "aio": {
                    "filename": self.filename,
                    "block_size_override": True,
                    "readonly": False,
                    "fallocate": False,
                }
            },
        )

    def config_entry(self) -> dict[str, object]:
        return {
            "method": "bdev_aio_create",
            "params": {
                "name": self.name,
                "block_size": self.block_size,
                "filename": self.filename,
                "readonly": False,
                "fallocate": False,
                "uuid": str(self.uuid),
            },
        }

    async def aclose(self) -> None:
        """Close the file once the I/O in flight has finished (its fd must not be reused)."""
        if self._fd < 0:
            return
        self._closing = True
        while self._in_flight:
            self._idle = anyio.Event()
            await self._idle.wait()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.claimed = False

    # --- block I/O (byte offsets, whole blocks) -----------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closing:
            raise ValueError(f"bdev {self.name} is closed")
        self._in_flight += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()

    def allocate(self, length: int) -> memoryview:
        return aligned_buffer(length)

    async def read(self, offset: int, into: memoryview) -> None:
        into = byte_view(into)
        check_io(self, offset, len(into))
        if not self.direct or _is_aligned(into):
            await self._run(_pread_all, self._fd, into, offset)
            return
        staging = aligned_buffer(len(into))
        await self._run(_pread_all, self._fd, staging, offset)
        into[:] = staging

    async def read_buffer(self, offset: int, length: int) -> Buffer:
        check_io(self, offset, length)
        buf = aligned_buffer(length)
        await self._run(_pread_all, self._fd, buf, offset)
        return buf

    async def write(self, offset: int, data: Buffer) -> None:
        view = byte_view(data)
        check_io(self, offset, len(view))
        if self.direct and not _is_aligned(view):
            staging = aligned_buffer(len(view))
            staging[:] = view
            view = staging
        await self._run(_pwrite_all, self._fd, view, offset)

    async def flush(self) -> None:
        await self._run(os.fdatasync, self._fd)

    async def write_zeroes(self, offset: int, length: int) -> None:
        check_io(self, offset, length)
        await self._run(self._write_zeroes, offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeros = aligned_buffer(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            _pwrite_all(self._fd, zeros[:n], offset)
            offset += n

    async def unmap(self, offset: int, length: int) -> None:
        check_io(self, offset, length)
        if length and self._punch_holes and await self._run(self._punch_hole, offset, length):
            return
        await self._run(self._write_zeroes, offset, length)

    def _punch_hole(self, offset: int, length: int) -> bool:
        assert _fallocate is not None
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            if self._punch_holes:
                log.info("%s: cannot punch holes (%s); deallocate writes zeros", self.name,
                         os.strerror(err))  # fmt: skip
            self._punch_holes = False
            return False
        raise OSError(err, os.strerror(err), self.filename)
