"""A RAM disk bdev (SPDK's ``bdev_malloc_create``): the blocks live in one zeroed bytearray.

Reads hand the host a view of that memory itself (no copy on the target); writes copy the host's
data in. Flush has nothing to do.
"""

from __future__ import annotations

import logging
import uuid as uuid_mod

from nvmeof.target.block import (
    BlockNamespace,
    check_block_size,
    check_io,
    describe_block_bdev,
)
from nvmeof.transport.base import Buffer

log = logging.getLogger("nvmeof.target.bdev.malloc")

PRODUCT_NAME = "Malloc disk"
_ZERO_CHUNK = 1 << 20


def byte_view(data: Buffer) -> memoryview:
    """A flat unsigned-byte view of any buffer (a numpy array's, say)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class MallocBdev:
    """``num_blocks`` blocks of ``block_size`` bytes in memory, zeroed at creation."""

    product_name = PRODUCT_NAME

    def __init__(
        self,
        name: str,
        num_blocks: int,
        block_size: int = 512,
        uuid: uuid_mod.UUID | None = None,
    ) -> None:
        if not name:
            raise ValueError("a bdev needs a name")
        if num_blocks < 1:
            raise ValueError(f"{name}: num_blocks must be at least 1, not {num_blocks}")
        self.name = name
        self.block_size = check_block_size(block_size)
        self.num_blocks = num_blocks
        self.uuid = uuid or uuid_mod.uuid4()
        self.claimed = False
        self._closed = False
        self._data = bytearray(num_blocks * block_size)  # calloc: pages appear on first touch
        self._view = memoryview(self._data)
        log.info(
            "malloc bdev %s: %d blocks of %d bytes (%d MiB)",
            name, num_blocks, block_size, num_blocks * block_size >> 20,
        )  # fmt: skip

    @property
    def size(self) -> int:
        return self.num_blocks * self.block_size

    def __repr__(self) -> str:
        return f"<MallocBdev {self.name} {self.num_blocks}x{self.block_size}>"

    # --- the Bdev protocol --------------------------------------------------------------------
    def make_namespace(self) -> BlockNamespace:
        self.claimed = True
        return BlockNamespace(self)

    def describe(self) -> dict[str, object]:
        return describe_block_bdev(self, product_name=PRODUCT_NAME, claimed=self.claimed)

    def config_entry(self) -> dict[str, object]:
        return {
            "method": "bdev_malloc_create",
            "params": {
                "name": self.name,
                "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "physical_block_size": self.block_size,
                "uuid": str(self.uuid),
                "optimal_io_boundary": 0,
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": False,
                "dif_pi_format": 0,
                "numa_id": -1,
            },
        }

    async def aclose(self) -> None:
        # The memory goes with the last reference (reads in flight may still hold views of it).
        self._view = memoryview(bytearray())
        self._data = bytearray()
        self.claimed = False
        self._closed = True

    # --- block I/O (byte offsets, whole blocks) -----------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError(f"bdev {self.name} is closed")
        check_io(self, offset, length)

    def allocate(self, length: int) -> memoryview:
        return memoryview(bytearray(length))

    async def read(self, offset: int, into: memoryview) -> None:
        into = byte_view(into)
        self._check(offset, len(into))
        into[:] = self._view[offset : offset + len(into)]

    async def read_buffer(self, offset: int, length: int) -> Buffer:
        self._check(offset, length)
        return self._view[offset : offset + length]

    async def write(self, offset: int, data: Buffer) -> None:
        view = byte_view(data)
        self._check(offset, len(view))
        self._view[offset : offset + len(view)] = view

    async def flush(self) -> None:
        return None

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self._view[offset : offset + n] = zeros[:n]
            offset += n

    async def unmap(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)
