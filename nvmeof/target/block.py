"""A block namespace (NVM command set, CSI 0) served from a block bdev (malloc, aio).

Read, Write, Flush, Write Zeroes and Dataset Management (deallocate), with the LBA checks of
REFERENCE.md 5.1: an LBA range past the end is 0x80 LBA Out of Range, a data length that is not
(NLB + 1) x block size is 0x0F Data SGL Length Invalid (as Linux nvmet), a wrong NSID never gets
here (the core answers 0x0B). FUA is honoured as write, then flush.
"""

from __future__ import annotations

import enum
import logging
import struct
import uuid
from collections.abc import Iterator, Mapping
from typing import Protocol

import attrs

from nvmeof.errors import CommandError
from nvmeof.spec.command import Command, NvmOpcode
from nvmeof.spec.identify import IDENTIFY_DATA_SIZE, IdentifyNamespace, LbaFormat
from nvmeof.spec.status import GenericStatus, Status, StatusCodeType
from nvmeof.target.namespace import CommandResult
from nvmeof.transport.base import Buffer, ControllerChannel, Request

log = logging.getLogger("nvmeof.target.block")

NVM_CSI = 0
DSM_RANGE_SIZE = 16
_DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in LBAs (1-based), SLBA

# Commands Supported and Effects: bit0 CSUPP, bit1 LBCC (logical block content change).
NVM_IO_COMMAND_EFFECTS: Mapping[int, int] = {
    NvmOpcode.FLUSH: 0x1,
    NvmOpcode.WRITE: 0x3,
    NvmOpcode.READ: 0x1,
    NvmOpcode.WRITE_ZEROES: 0x3,
    NvmOpcode.DATASET_MANAGEMENT: 0x3,
}

# DLFEAT: bits 2:0 = 001b (a deallocated block reads as zeros), bit 3 (Write Zeroes may deallocate).
_DLFEAT = 0x1 | 0x8


class MediaStatus(enum.IntEnum):
    """Media and data integrity errors (SCT 2) a failing backing file turns into."""

    WRITE_FAULT = 0x80
    UNRECOVERED_READ_ERROR = 0x81


class RwFlag(enum.IntFlag):
    """CDW12 bits of Read, Write and Write Zeroes (above the 16-bit NLB)."""

    DEAC = 1 << 25  # Write Zeroes only: deallocate
    FUA = 1 << 30
    LIMITED_RETRY = 1 << 31


class DsmAttribute(enum.IntFlag):
    """Dataset Management CDW11."""

    INTEGRAL_READ = 1 << 0
    INTEGRAL_WRITE = 1 << 1
    DEALLOCATE = 1 << 2


@attrs.frozen
class LbaRange:
    slba: int
    nlb: int  # a count of blocks (1-based)

    @classmethod
    def from_command(cls, cmd: Command) -> LbaRange:
        """SLBA (CDW10-11) and 0's based NLB (CDW12 bits 15:0) of Read/Write/Write Zeroes."""
        return cls(slba=cmd.cdw10 | cmd.cdw11 << 32, nlb=(cmd.cdw12 & 0xFFFF) + 1)


def decode_dsm_ranges(data: Buffer, count: int) -> Iterator[LbaRange]:
    """The ``count`` 16-byte Dataset Management ranges at the start of ``data``."""
    for i in range(count):
        _, length, slba = _DSM_RANGE.unpack_from(data, i * DSM_RANGE_SIZE)
        yield LbaRange(slba=slba, nlb=length)


class BlockDevice(Protocol):
    """What a block namespace needs of its bdev. Offsets and lengths are in bytes, block-aligned."""

    name: str
    uuid: uuid.UUID
    block_size: int
    num_blocks: int

    def allocate(self, length: int) -> memoryview:
        """A buffer ``write`` takes without a copy (aligned for O_DIRECT where that matters)."""

    async def read(self, offset: int, into: memoryview) -> None: ...

    async def read_buffer(self, offset: int, length: int) -> Buffer:
        """The bytes at ``offset``: a view of the bdev's own memory where it has one."""

    async def write(self, offset: int, data: Buffer) -> None: ...

    async def flush(self) -> None: ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    async def unmap(self, offset: int, length: int) -> None:
        """Deallocate; the range reads as zeros afterwards."""


def _error(sc: int, message: str) -> CommandError:
    return CommandError(Status.generic(sc), message)


class BlockNamespace:
    """Serves the NVM command set over one block bdev."""

    csi = NVM_CSI

    def __init__(self, bdev: BlockDevice) -> None:
        self.bdev = bdev
        self.nsid = 0
        self.uuid = bdev.uuid
        self.block_size = check_block_size(bdev.block_size)
        self.num_blocks = bdev.num_blocks
        self._lbads = self.block_size.bit_length() - 1

    # --- identify ---------------------------------------------------------------------------
    def identify_namespace(self) -> bytes:
        return IdentifyNamespace(
            nsze=self.num_blocks,
            ncap=self.num_blocks,
            nuse=self.num_blocks,
            nlbaf=0,
            flbas=0,
            nmic=1,
            dlfeat=_DLFEAT,
            nguid=self.uuid.bytes,
            lbaf=(LbaFormat(ms=0, lbads=self._lbads, rp=0),),
        ).pack()

    def identify_csi_namespace(self) -> bytes:
        return bytes(IDENTIFY_DATA_SIZE)

    def identify_csi_controller(self) -> bytes:
        return bytes(IDENTIFY_DATA_SIZE)

    def io_command_effects(self) -> Mapping[int, int]:
        return NVM_IO_COMMAND_EFFECTS

    def get_feature(self, fid: int) -> int | None:
        return None

    def set_feature(self, fid: int, value: int) -> bool:
        return False

    def describe(self) -> dict[str, object]:
        """SPDK's ``nvmf_get_subsystems`` namespace entry, plus the command set and geometry."""
        return {
            "nsid": self.nsid,
            "bdev_name": self.bdev.name,
            "name": self.bdev.name,
            "nguid": self.uuid.hex.upper(),
            "uuid": str(self.uuid),
            "csi": self.csi,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
        }

    # --- I/O --------------------------------------------------------------------------------
    async def execute(self, request: Request, channel: ControllerChannel) -> CommandResult:
        try:
            return await self._execute(request, channel)
        except OSError as exc:
            # The backing file failed us: a media error the host may report or retry elsewhere.
            opcode = request.command.opcode
            log.error("%s: opcode 0x%02x failed: %s", self.bdev.name, opcode, exc)
            sc = MediaStatus.UNRECOVERED_READ_ERROR
            if opcode != NvmOpcode.READ:
                sc = MediaStatus.WRITE_FAULT
            raise CommandError(Status(StatusCodeType.MEDIA, sc), str(exc)) from exc

    async def _execute(self, request: Request, channel: ControllerChannel) -> CommandResult:
        cmd = request.command
        opcode = cmd.opcode
        if opcode == NvmOpcode.READ:
            return await self._read(cmd)
        if opcode == NvmOpcode.WRITE:
            return await self._write(request, channel)
        if opcode == NvmOpcode.FLUSH:
            await self.bdev.flush()
            return CommandResult()
        if opcode == NvmOpcode.WRITE_ZEROES:
            return await self._write_zeroes(cmd)
        if opcode == NvmOpcode.DATASET_MANAGEMENT:
            return await self._dataset_management(request, channel)
        raise _error(GenericStatus.INVALID_OPCODE, f"NVM opcode 0x{opcode:02x}")

    def _check_range(self, rng: LbaRange) -> None:
        if rng.slba + rng.nlb > self.num_blocks:
            raise _error(
                GenericStatus.LBA_OUT_OF_RANGE,
                f"LBAs {rng.slba}+{rng.nlb} beyond {self.num_blocks} blocks",
            )

    def _check_length(self, cmd: Command, rng: LbaRange) -> int:
        length = rng.nlb * self.block_size
        if cmd.dptr.length != length:
            raise _error(
                GenericStatus.DATA_SGL_LENGTH_INVALID,
                f"SGL length {cmd.dptr.length} != {rng.nlb} blocks x {self.block_size}",
            )
        return length

    async def _read(self, cmd: Command) -> CommandResult:
        rng = LbaRange.from_command(cmd)
        self._check_range(rng)
        length = self._check_length(cmd, rng)
        data = await self.bdev.read_buffer(rng.slba * self.block_size, length)
        return CommandResult(data=[data])

    async def _write(self, request: Request, channel: ControllerChannel) -> CommandResult:
        cmd = request.command
        rng = LbaRange.from_command(cmd)
        self._check_range(rng)
        length = self._check_length(cmd, rng)
        data: Buffer
        if request.in_capsule is not None and len(request.in_capsule) == length:
            data = request.in_capsule  # the connection's own buffer: no copy on our side
        else:
            buf = self.bdev.allocate(length)
            await channel.pull(request, buf)
            data = buf
        await self.bdev.write(rng.slba * self.block_size, data)
        if cmd.cdw12 & RwFlag.FUA:
            await self.bdev.flush()
        return CommandResult()

    async def _write_zeroes(self, cmd: Command) -> CommandResult:
        rng = LbaRange.from_command(cmd)
        self._check_range(rng)
        offset, length = rng.slba * self.block_size, rng.nlb * self.block_size
        if cmd.cdw12 & RwFlag.DEAC:
            await self.bdev.unmap(offset, length)  # reads as zeros afterwards (DLFEAT)
        else:
            await self.bdev.write_zeroes(offset, length)
        if cmd.cdw12 & RwFlag.FUA:
            await self.bdev.flush()
        return CommandResult()

    async def _dataset_management(
        self, request: Request, channel: ControllerChannel
    ) -> CommandResult:
        cmd = request.command
        if not cmd.cdw11 & DsmAttribute.DEALLOCATE:
            return CommandResult()  # only hints (integral read/write): nothing to do
        count = (cmd.cdw10 & 0xFF) + 1
        size = count * DSM_RANGE_SIZE
        if cmd.dptr.length < size:
            raise _error(
                GenericStatus.DATA_SGL_LENGTH_INVALID,
                f"SGL length {cmd.dptr.length} < {count} ranges x {DSM_RANGE_SIZE}",
            )
        raw = bytearray(size)
        await channel.pull(request, memoryview(raw))
        ranges = [r for r in decode_dsm_ranges(raw, count) if r.nlb]
        for rng in ranges:  # refuse the whole command before deallocating any of it
            self._check_range(rng)
        for rng in ranges:
            await self.bdev.unmap(rng.slba * self.block_size, rng.nlb * self.block_size)
        return CommandResult()


# --- what block bdevs report (SPDK's bdev_get_bdevs entry) ------------------------------------
_IO_TYPES = (
    "read", "write", "unmap", "flush", "reset", "nvme_admin", "nvme_io", "nvme_io_md",
    "write_zeroes", "zcopy", "get_zone_info", "zone_management", "zone_append", "compare",
    "compare_and_write", "abort", "seek_hole", "seek_data", "copy", "nvme_iov_md", "nvme_nssr",
    "write_uncorrectable",
)  # fmt: skip
BLOCK_IO_TYPES = frozenset({"read", "write", "unmap", "flush", "reset", "write_zeroes"})


def describe_block_bdev(
    bdev: BlockDevice,
    *,
    product_name: str,
    claimed: bool,
    driver_specific: Mapping[str, object] | None = None,
    io_types: frozenset[str] = BLOCK_IO_TYPES,
) -> dict[str, object]:
    """One ``bdev_get_bdevs`` entry, with SPDK's field names and order (../shared/spdk/)."""
    entry: dict[str, object] = {
        "name": bdev.name,
        "aliases": [str(bdev.uuid)],
        "product_name": product_name,
        "block_size": bdev.block_size,
        "num_blocks": bdev.num_blocks,
        "preferred_write_alignment": 0,
        "preferred_write_granularity": 0,
        "optimal_write_size": 0,
        "preferred_unmap_alignment": 0,
        "preferred_unmap_granularity": 0,
        "uuid": str(bdev.uuid),
        "numa_id": -1,
        "assigned_rate_limits": {
            "rw_ios_per_sec": 0,
            "rw_mbytes_per_sec": 0,
            "r_mbytes_per_sec": 0,
            "w_mbytes_per_sec": 0,
        },
        "claimed": claimed,
    }
    if claimed:
        entry["claim_type"] = "exclusive_write"
    entry["zoned"] = False
    entry["supported_io_types"] = {name: name in io_types for name in _IO_TYPES}
    entry["driver_specific"] = dict(driver_specific or {})
    return entry


def check_block_size(block_size: int) -> int:
    """SPDK's rule for malloc and aio bdevs: a power of two, at least 512."""
    if block_size < 512 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two >= 512")
    return block_size


def check_io(bdev: BlockDevice, offset: int, length: int) -> None:
    """A bdev-level guard: whole blocks, inside the device (the namespace checks LBAs first)."""
    bs = bdev.block_size
    if offset < 0 or length < 0 or offset % bs or length % bs:
        raise ValueError(f"{bdev.name}: I/O at {offset}+{length} is not in whole {bs}-byte blocks")
    if offset + length > bdev.num_blocks * bs:
        raise ValueError(f"{bdev.name}: I/O at {offset}+{length} beyond the end")
