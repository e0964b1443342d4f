"""SGL descriptors (16 bytes, carried in an SQE's DPTR)."""

from __future__ import annotations

import enum
import struct

import attrs

SGL_DESCRIPTOR_SIZE = 16


class SglType(enum.IntEnum):
    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3
    KEYED_DATA_BLOCK = 0x4
    TRANSPORT_DATA_BLOCK = 0x5
    VENDOR = 0xF


class SglSubtype(enum.IntEnum):
    ADDRESS = 0x0
    OFFSET = 0x1
    TRANSPORT = 0xA
    INVALIDATE_KEY = 0xF


class SglIdentifier(enum.IntEnum):
    """Whole identifier bytes (type << 4 | subtype) that fabrics transports use."""

    DATA_BLOCK_OFFSET = 0x01  # in-capsule data (TCP, RDMA)
    KEYED_DATA_BLOCK = 0x40  # RDMA host memory
    KEYED_DATA_BLOCK_INVALIDATE = 0x4F
    LAST_SEGMENT_OFFSET = 0x31
    TRANSPORT_DATA_BLOCK = 0x5A  # TCP: data moves by R2T/H2CData or C2HData


_UNKEYED = struct.Struct("<QI3xB")
_KEYED_HEAD = struct.Struct("<Q")


@attrs.frozen
class SglDescriptor:
    address: int = 0
    length: int = 0
    key: int = 0
    identifier: int = SglIdentifier.TRANSPORT_DATA_BLOCK

    @property
    def sgl_type(self) -> int:
        return self.identifier >> 4

    @property
    def subtype(self) -> int:
        return self.identifier & 0xF

    @property
    def keyed(self) -> bool:
        return self.sgl_type == SglType.KEYED_DATA_BLOCK

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        if self.keyed:
            _KEYED_HEAD.pack_into(buf, offset, self.address)
            buf[offset + 8 : offset + 11] = (self.length & 0xFFFFFF).to_bytes(3, "little")
            buf[offset + 11 : offset + 15] = (self.key & 0xFFFFFFFF).to_bytes(4, "little")
            buf[offset + 15] = self.identifier
        else:
            _UNKEYED.pack_into(buf, offset, self.address, self.length, self.identifier)

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> SglDescriptor:
        identifier = buf[offset + 15]
        if identifier >> 4 == SglType.KEYED_DATA_BLOCK:
            (address,) = _KEYED_HEAD.unpack_from(buf, offset)
            length = int.from_bytes(buf[offset + 8 : offset + 11], "little")
            key = int.from_bytes(buf[offset + 11 : offset + 15], "little")
            return cls(address, length, key, identifier)
        address, length, identifier = _UNKEYED.unpack_from(buf, offset)
        if address:
            return cls(address, length, 0, identifier)
        # Every TCP command's SGL is one of a few (in-capsule or transport, a few sizes): a
        # frozen value, so one record per kind serves them all (bounded: sizes are the host's).
        kind = (length, identifier)
        sgl = _BY_LENGTH.get(kind)
        if sgl is None:
            sgl = cls(0, length, 0, identifier)
            if len(_BY_LENGTH) < _BY_LENGTH_MAX:
                _BY_LENGTH[kind] = sgl
        return sgl


_BY_LENGTH: dict[tuple[int, int], SglDescriptor] = {}
_BY_LENGTH_MAX = 1024


def pack_unkeyed_into(
    buf: bytearray | memoryview, offset: int, address: int, length: int, identifier: int
) -> None:
    """An unkeyed descriptor straight into ``buf``: what a transport does for every command,
    without building a ``SglDescriptor`` first."""
    _UNKEYED.pack_into(buf, offset, address, length, identifier)
