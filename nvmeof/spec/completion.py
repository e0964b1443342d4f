"""The 16-byte completion queue entry."""

from __future__ import annotations

import struct

import attrs

from nvmeof.spec.status import SUCCESS, Status

CQE_SIZE = 16
SQHD_FLOW_CONTROL_DISABLED = 0xFFFF

_CQE = struct.Struct("<IIHHHH")


@attrs.frozen
class Completion:
    cid: int
    status: Status = SUCCESS
    dw0: int = 0
    dw1: int = 0
    sqhd: int = 0
    sqid: int = 0

    @property
    def result(self) -> int:
        """DW0 and DW1 as one 64-bit value (Property Get of an 8-byte property)."""
        return self.dw0 | self.dw1 << 32

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _CQE.pack_into(
            buf, offset, self.dw0, self.dw1, self.sqhd, self.sqid, self.cid, self.status.to_field()
        )

    def to_bytes(self) -> bytes:
        buf = bytearray(CQE_SIZE)
        self.pack_into(buf)
        return bytes(buf)

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Completion:
        dw0, dw1, sqhd, sqid, cid, field = _CQE.unpack_from(buf, offset)
        # Positional, in field order: every completion comes here.
        return cls(cid, Status.from_field(field), dw0, dw1, sqhd, sqid)
