"""NVMe/TCP PDU codecs (REFERENCE section 1): common header, PDU-specific headers, digests.

Pure codecs, no state. Records describe the PDU-specific header (PSH) only; ``pack_into`` and
``unpack_from`` take the offset of the *PDU start* and touch bytes ``[offset + 8, offset + hlen)``.
SQEs and CQEs are opaque 64/16-byte buffers at this layer. Payloads never pass through here:
``build_header`` returns the header bytes (CH + PSH + HDGST + pad) and the caller sends the payload
views and the data digest after it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import IntEnum, IntFlag
from typing import ClassVar, TypeAlias

import attrs
import crc32c as _crc32c

Buffer: TypeAlias = bytes | bytearray | memoryview

COMMON_HEADER_SIZE = 8
DIGEST_SIZE = 4
IC_PDU_SIZE = 128
TERM_REQ_HEADER_SIZE = 24
TERM_REQ_MAX_DATA = 128  # offending header bytes carried after a TermReq header
TERM_REQ_MAX_PLEN = TERM_REQ_HEADER_SIZE + TERM_REQ_MAX_DATA
SQE_SIZE = 64
CQE_SIZE = 16
MAX_PDA = 31  # HPDA/CPDA are 0's based dword counts, 0..31
MAX_PDO = 255


class PduType(IntEnum):
    IC_REQ = 0x00
    IC_RESP = 0x01
    H2C_TERM_REQ = 0x02
    C2H_TERM_REQ = 0x03
    CAPSULE_CMD = 0x04
    CAPSULE_RESP = 0x05
    H2C_DATA = 0x06
    C2H_DATA = 0x07
    R2T = 0x09


class PduFlags(IntFlag):
    HDGSTF = 0x01
    DDGSTF = 0x02
    LAST_PDU = 0x04
    SUCCESS = 0x08


class FatalErrorStatus(IntEnum):
    INVALID_HEADER_FIELD = 0x01
    PDU_SEQUENCE_ERROR = 0x02
    HEADER_DIGEST_ERROR = 0x03
    DATA_TRANSFER_OUT_OF_RANGE = 0x04
    DATA_TRANSFER_LIMIT_EXCEEDED = 0x05  # also "R2T limit exceeded"
    UNSUPPORTED_PARAMETER = 0x06


#: HLEN (CH + PSH, excluding HDGST) per PDU type.
HLEN: dict[PduType, int] = {
    PduType.IC_REQ: 128,
    PduType.IC_RESP: 128,
    PduType.H2C_TERM_REQ: 24,
    PduType.C2H_TERM_REQ: 24,
    PduType.CAPSULE_CMD: 72,
    PduType.CAPSULE_RESP: 24,
    PduType.H2C_DATA: 24,
    PduType.C2H_DATA: 24,
    PduType.R2T: 24,
}

#: PDU types that carry a header digest when it is negotiated (never IC or TermReq).
HEADER_DIGEST_TYPES = frozenset(
    {PduType.CAPSULE_CMD, PduType.CAPSULE_RESP, PduType.H2C_DATA, PduType.C2H_DATA, PduType.R2T}
)
#: PDU types whose data is covered by a data digest when it is negotiated.
DATA_DIGEST_TYPES = frozenset({PduType.CAPSULE_CMD, PduType.H2C_DATA, PduType.C2H_DATA})

#: FLAGS bits each PDU type may carry (anything else is an invalid header field, FEI 1).
ALLOWED_FLAGS: dict[PduType, PduFlags] = {
    PduType.IC_REQ: PduFlags(0),
    PduType.IC_RESP: PduFlags(0),
    PduType.H2C_TERM_REQ: PduFlags(0),
    PduType.C2H_TERM_REQ: PduFlags(0),
    PduType.CAPSULE_CMD: PduFlags.HDGSTF | PduFlags.DDGSTF,
    PduType.CAPSULE_RESP: PduFlags.HDGSTF,
    PduType.H2C_DATA: PduFlags.HDGSTF | PduFlags.DDGSTF | PduFlags.LAST_PDU,
    PduType.C2H_DATA: PduFlags.HDGSTF | PduFlags.DDGSTF | PduFlags.LAST_PDU | PduFlags.SUCCESS,
    PduType.R2T: PduFlags.HDGSTF,
}

# Field offsets within a PDU header, used as FEI values.
FEI_PDU_TYPE = 0
FEI_FLAGS = 1
FEI_HLEN = 2
FEI_PDO = 3
FEI_PLEN = 4
FEI_PFV = 8
FEI_CCCID = 8
FEI_PDA = 10  # ICReq HPDA / ICResp CPDA
FEI_TTAG = 10
FEI_DIGEST = 11
FEI_MAXH2CDATA = 12
FEI_DATAO = 12  # also R2TO
FEI_DATAL = 16  # also R2TL

_CH = struct.Struct("<BBBBI")
_IC = struct.Struct("<HBBI")  # PFV, HPDA|CPDA, DIGEST, MAXR2T|MAXH2CDATA
_TERM = struct.Struct("<HI")  # FES, FEI
_XFER = struct.Struct("<HHII")  # CCCID, TTAG|reserved, DATAO|R2TO, DATAL|R2TL
_DIGEST = struct.Struct("<I")

_DIGEST_HDR = 0x01
_DIGEST_DATA = 0x02


def crc32c_of(buffers: Iterable[Buffer]) -> int:
    """CRC32C (Castagnoli) over the concatenation of ``buffers``, without concatenating them."""
    value = 0
    for buf in buffers:
        value = _crc32c.crc32c(buf, value=value)
    return value


def pack_digest(value: int) -> bytes:
    """A digest as it goes on the wire (little-endian)."""
    return _DIGEST.pack(value)


def unpack_digest(buf: Buffer, offset: int = 0) -> int:
    value: int = _DIGEST.unpack_from(buf, offset)[0]
    return value


def data_offset(hlen: int, header_digest: bool, pda: int) -> int:
    """PDO of a PDU carrying data: header (+HDGST) rounded up to a multiple of (pda+1)*4."""
    unit = (pda + 1) * 4
    end = hlen + (DIGEST_SIZE if header_digest else 0)
    return -(-end // unit) * unit


@attrs.frozen
class CommonHeader:
    """CH: the first 8 bytes of every PDU. ``pdu_type`` is an int so unknown types can be parsed."""

    pdu_type: int
    flags: int
    hlen: int
    pdo: int
    plen: int

    SIZE: ClassVar[int] = COMMON_HEADER_SIZE

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _CH.pack_into(buf, offset, self.pdu_type, self.flags, self.hlen, self.pdo, self.plen)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> CommonHeader:
        return cls(*_CH.unpack_from(buf, offset))


@attrs.frozen
class ICReq:
    pfv: int = 0
    hpda: int = 0
    header_digest: bool = False
    data_digest: bool = False
    maxr2t: int = 0

    pdu_type: ClassVar[PduType] = PduType.IC_REQ

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        digest = (_DIGEST_HDR if self.header_digest else 0) | (
            _DIGEST_DATA if self.data_digest else 0
        )
        _IC.pack_into(buf, offset + 8, self.pfv, self.hpda, digest, self.maxr2t)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> ICReq:
        pfv, hpda, digest, maxr2t = _IC.unpack_from(buf, offset + 8)
        return cls(pfv, hpda, bool(digest & _DIGEST_HDR), bool(digest & _DIGEST_DATA), maxr2t)

    def to_bytes(self) -> bytearray:
        return build_header(self)


@attrs.frozen
class ICResp:
    pfv: int = 0
    cpda: int = 0
    header_digest: bool = False
    data_digest: bool = False
    maxh2cdata: int = 131072

    pdu_type: ClassVar[PduType] = PduType.IC_RESP

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        digest = (_DIGEST_HDR if self.header_digest else 0) | (
            _DIGEST_DATA if self.data_digest else 0
        )
        _IC.pack_into(buf, offset + 8, self.pfv, self.cpda, digest, self.maxh2cdata)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> ICResp:
        pfv, cpda, digest, maxh2cdata = _IC.unpack_from(buf, offset + 8)
        return cls(pfv, cpda, bool(digest & _DIGEST_HDR), bool(digest & _DIGEST_DATA), maxh2cdata)

    def to_bytes(self) -> bytearray:
        return build_header(self)


@attrs.frozen
class TermReq:
    """H2CTermReq / C2HTermReq header; the offending PDU header follows as data (not digested)."""

    fes: int
    fei: int = 0

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _TERM.pack_into(buf, offset + 8, self.fes, self.fei)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> TermReq:
        return cls(*_TERM.unpack_from(buf, offset + 8))

    def to_bytes(self, pdu_type: PduType, offending: Buffer = b"") -> bytearray:
        """The whole termination PDU (header + at most 128 bytes of ``offending``)."""
        body = memoryview(offending)[:TERM_REQ_MAX_DATA]
        out = bytearray(TERM_REQ_HEADER_SIZE + len(body))
        CommonHeader(pdu_type, 0, TERM_REQ_HEADER_SIZE, 0, len(out)).pack_into(out)
        self.pack_into(out)
        out[TERM_REQ_HEADER_SIZE:] = body
        return out


@attrs.frozen
class R2T:
    cccid: int
    ttag: int
    r2to: int
    r2tl: int

    pdu_type: ClassVar[PduType] = PduType.R2T

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _XFER.pack_into(buf, offset + 8, self.cccid, self.ttag, self.r2to, self.r2tl)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> R2T:
        return cls(*_XFER.unpack_from(buf, offset + 8))


@attrs.frozen
class H2CDataHeader:
    cccid: int
    ttag: int
    datao: int
    datal: int

    pdu_type: ClassVar[PduType] = PduType.H2C_DATA

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _XFER.pack_into(buf, offset + 8, self.cccid, self.ttag, self.datao, self.datal)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> H2CDataHeader:
        return cls(*_XFER.unpack_from(buf, offset + 8))


@attrs.frozen
class C2HDataHeader:
    cccid: int
    datao: int
    datal: int

    pdu_type: ClassVar[PduType] = PduType.C2H_DATA

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _XFER.pack_into(buf, offset + 8, self.cccid, 0, self.datao, self.datal)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> C2HDataHeader:
        cccid, _reserved, datao, datal = _XFER.unpack_from(buf, offset + 8)
        return cls(cccid, datao, datal)


@attrs.frozen
class CapsuleCmdHeader:
    """CapsuleCmd PSH: the 64-byte SQE, opaque here."""

    sqe: Buffer = attrs.field(converter=bytes)

    pdu_type: ClassVar[PduType] = PduType.CAPSULE_CMD

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        buf[offset + 8 : offset + 8 + SQE_SIZE] = self.sqe

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> CapsuleCmdHeader:
        return cls(bytes(memoryview(buf)[offset + 8 : offset + 8 + SQE_SIZE]))


@attrs.frozen
class CapsuleRespHeader:
    """CapsuleResp PSH: the 16-byte CQE, opaque here."""

    cqe: Buffer = attrs.field(converter=bytes)

    pdu_type: ClassVar[PduType] = PduType.CAPSULE_RESP

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        buf[offset + 8 : offset + 8 + CQE_SIZE] = self.cqe

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> CapsuleRespHeader:
        return cls(bytes(memoryview(buf)[offset + 8 : offset + 8 + CQE_SIZE]))


Psh: TypeAlias = (
    ICReq | ICResp | R2T | H2CDataHeader | C2HDataHeader | CapsuleCmdHeader | CapsuleRespHeader
)


_HDGSTF = int(PduFlags.HDGSTF)
_DDGSTF = int(PduFlags.DDGSTF)


def _frame(
    pdu_type: int,
    hlen: int,
    flags: int,
    *,
    header_digest: bool,
    data_length: int,
    data_digest: bool,
    pda: int,
) -> bytearray:
    """A header buffer with its CH packed and room for the PSH (and HDGST, and pad to PDO)."""
    data_digest = data_digest and data_length > 0
    if data_length:
        size = pdo = data_offset(hlen, header_digest, pda)
    else:
        pdo = 0
        size = hlen + (DIGEST_SIZE if header_digest else 0)
    # plain ints: IntFlag arithmetic is slow, and this runs for every PDU sent
    flags = int(flags) | (_HDGSTF if header_digest else 0) | (_DDGSTF if data_digest else 0)
    plen = size + data_length + (DIGEST_SIZE if data_digest else 0)
    out = bytearray(size)
    _CH.pack_into(out, 0, pdu_type, flags, hlen, pdo, plen)
    return out


def _sealed(out: bytearray, hlen: int, header_digest: bool) -> bytearray:
    """``out`` with its HDGST, once the PSH is in."""
    if header_digest:
        _DIGEST.pack_into(out, hlen, _crc32c.crc32c(memoryview(out)[:hlen]))
    return out


def build_header(
    psh: Psh,
    *,
    flags: int = 0,
    header_digest: bool = False,
    data_length: int = 0,
    data_digest: bool = False,
    pda: int = 0,
) -> bytearray:
    """The header of a PDU: CH + PSH (+ HDGST) (+ pad up to PDO when ``data_length`` > 0).

    HDGSTF/DDGSTF are set from ``header_digest``/``data_digest`` (DDGSTF only when there is data);
    PLEN counts the data and its digest, which the caller sends after this header.
    """
    pdu_type = psh.pdu_type
    hlen = HLEN[pdu_type]
    header_digest = header_digest and pdu_type in HEADER_DIGEST_TYPES
    out = _frame(
        pdu_type,
        hlen,
        flags,
        header_digest=header_digest,
        data_length=data_length,
        data_digest=data_digest,
        pda=pda,
    )
    psh.pack_into(out, 0)
    return _sealed(out, hlen, header_digest)


# The PDUs sent for every command get builders without the intermediate PSH record (checked
# byte for byte against build_header in the tests).
_CAPSULE_CMD = int(PduType.CAPSULE_CMD)
_CMD_HLEN = HLEN[PduType.CAPSULE_CMD]
_C2H_DATA = int(PduType.C2H_DATA)
_C2H_HLEN = HLEN[PduType.C2H_DATA]
_CAPSULE_RESP = int(PduType.CAPSULE_RESP)
_RESP_HLEN = HLEN[PduType.CAPSULE_RESP]
# Without digests or padding (most connections) these headers are fixed but for a few fields.
_C2H_PLAIN = struct.Struct("<BBBBIHHII4x")
_RESP_PLAIN_CH = _CH.pack(_CAPSULE_RESP, 0, _RESP_HLEN, 0, _RESP_HLEN)


def capsule_cmd_header(
    sqe: memoryview, *, header_digest: bool, data_length: int, data_digest: bool, pda: int
) -> bytearray:
    """``build_header(CapsuleCmdHeader(sqe), ...)``."""
    if not (header_digest or (data_digest and data_length) or pda):
        out = bytearray(_CMD_HLEN)
        pdo = _CMD_HLEN if data_length else 0
        _CH.pack_into(out, 0, _CAPSULE_CMD, 0, _CMD_HLEN, pdo, _CMD_HLEN + data_length)
        out[8:_CMD_HLEN] = sqe
        return out
    out = _frame(
        _CAPSULE_CMD,
        _CMD_HLEN,
        0,
        header_digest=header_digest,
        data_length=data_length,
        data_digest=data_digest,
        pda=pda,
    )
    out[8:_CMD_HLEN] = sqe
    return _sealed(out, _CMD_HLEN, header_digest)


def c2h_data_header(
    cccid: int,
    datao: int,
    datal: int,
    *,
    flags: int,
    header_digest: bool,
    data_digest: bool,
    pda: int,
) -> bytearray:
    """``build_header(C2HDataHeader(cccid, datao, datal), ...)``."""
    if datal and not (header_digest or data_digest or pda):  # the usual connection
        out = bytearray(_C2H_HLEN)
        _C2H_PLAIN.pack_into(
            out,
            0,
            _C2H_DATA,
            flags,
            _C2H_HLEN,
            _C2H_HLEN,
            _C2H_HLEN + datal,
            cccid,
            0,
            datao,
            datal,
        )
        return out
    out = _frame(
        _C2H_DATA,
        _C2H_HLEN,
        flags,
        header_digest=header_digest,
        data_length=datal,
        data_digest=data_digest,
        pda=pda,
    )
    _XFER.pack_into(out, 8, cccid, 0, datao, datal)
    return _sealed(out, _C2H_HLEN, header_digest)


def capsule_resp_header(cqe: memoryview, *, header_digest: bool) -> bytearray:
    """``build_header(CapsuleRespHeader(cqe), ...)``."""
    if not header_digest:
        out = bytearray(_RESP_PLAIN_CH)
        out += cqe
        return out
    out = _frame(
        _CAPSULE_RESP,
        _RESP_HLEN,
        0,
        header_digest=header_digest,
        data_length=0,
        data_digest=False,
        pda=0,
    )
    out[8:_RESP_HLEN] = cqe
    return _sealed(out, _RESP_HLEN, header_digest)
