"""The 64-byte submission queue entry, admin and NVM opcodes, and data direction."""

from __future__ import annotations

import enum
import struct

import attrs

from nvmeof.spec.sgl import SglDescriptor

SQE_SIZE = 64
PSDT_SGL = 0x40  # flags byte: PSDT = SGL, as every fabrics host sends
NSID_ALL = 0xFFFFFFFF


class AdminOpcode(enum.IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18
    DOORBELL_BUFFER_CONFIG = 0x7C
    FABRICS = 0x7F


class NvmOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class DataDirection(enum.IntEnum):
    """Opcode bits 1:0 (for fabrics commands, the same bits of FCTYPE)."""

    NONE = 0
    HOST_TO_CONTROLLER = 1
    CONTROLLER_TO_HOST = 2
    BIDIRECTIONAL = 3


# opcode, flags, cid, nsid, cdw2, cdw3, mptr, dptr (16 bytes, packed apart), cdw10..cdw15
_SQE = struct.Struct("<BBHIIIQ16xIIIIII")


@attrs.frozen
class Command:
    """A submission queue entry. Command-specific meaning of the dwords lives with each command."""

    opcode: int
    cid: int = 0
    nsid: int = 0
    flags: int = PSDT_SGL
    cdw2: int = 0
    cdw3: int = 0
    mptr: int = 0
    dptr: SglDescriptor = SglDescriptor()  # noqa: RUF009 -- frozen value, safe to share
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    @property
    def fctype(self) -> int:
        """Fabrics command type (byte 4), meaningful when opcode is 0x7F."""
        return self.nsid & 0xFF

    @property
    def data_direction(self) -> DataDirection:
        bits = self.fctype if self.opcode == AdminOpcode.FABRICS else self.opcode
        return DataDirection(bits & 0x3)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0, *, dptr: bool = True) -> None:
        """The 64-byte SQE at ``offset``; without ``dptr``, bytes 24..39 are left for the transport
        to fill (TCP and RDMA each write their own SGL there)."""
        _SQE.pack_into(
            buf,
            offset,
            self.opcode,
            self.flags,
            self.cid,
            self.nsid,
            self.cdw2,
            self.cdw3,
            self.mptr,
            self.cdw10,
            self.cdw11,
            self.cdw12,
            self.cdw13,
            self.cdw14,
            self.cdw15,
        )
        if dptr:
            self.dptr.pack_into(buf, offset + 24)

    def to_bytes(self) -> bytes:
        buf = bytearray(SQE_SIZE)
        self.pack_into(buf)
        return bytes(buf)

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Command:
        (opcode, flags, cid, nsid, cdw2, cdw3, mptr, c10, c11, c12, c13, c14, c15) = (
            _SQE.unpack_from(buf, offset)
        )
        dptr = SglDescriptor.unpack_from(buf, offset + 24)
        # Positional, in field order: twice as fast as keywords, and every command comes here.
        return cls(opcode, cid, nsid, flags, cdw2, cdw3, mptr, dptr, c10, c11, c12, c13, c14, c15)

    def with_cid(self, cid: int) -> Command:
        return attrs.evolve(self, cid=cid)

    def with_dptr(self, dptr: SglDescriptor) -> Command:
        return attrs.evolve(self, dptr=dptr)
