"""NVMe/TCP PDU codecs: golden vectors and hypothesis round trips."""

from __future__ import annotations

import struct

import crc32c
from hypothesis import example, given
from hypothesis import strategies as st

from nvmeof.tcp.pdu import (
    HLEN,
    R2T,
    C2HDataHeader,
    CapsuleCmdHeader,
    CapsuleRespHeader,
    CommonHeader,
    FatalErrorStatus,
    H2CDataHeader,
    ICReq,
    ICResp,
    PduFlags,
    PduType,
    TermReq,
    build_header,
    c2h_data_header,
    capsule_cmd_header,
    capsule_resp_header,
    crc32c_of,
    data_offset,
    pack_digest,
    unpack_digest,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def test_enum_values() -> None:
    assert [int(t) for t in PduType] == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert int(PduFlags.HDGSTF) == 1
    assert int(PduFlags.DDGSTF) == 2
    assert int(PduFlags.LAST_PDU) == 4
    assert int(PduFlags.SUCCESS) == 8
    assert int(FatalErrorStatus.INVALID_HEADER_FIELD) == 1
    assert int(FatalErrorStatus.UNSUPPORTED_PARAMETER) == 6
    assert HLEN[PduType.CAPSULE_CMD] == 72
    assert HLEN[PduType.IC_REQ] == 128


def test_icreq_golden() -> None:
    pdu = ICReq().to_bytes()
    assert len(pdu) == 128
    assert bytes(pdu[:8]) == bytes.fromhex("0000800080000000")
    assert bytes(pdu[8:]) == bytes(120)
    pdu = ICReq(hpda=2, header_digest=True, data_digest=True, maxr2t=3).to_bytes()
    assert bytes(pdu[8:16]) == bytes.fromhex("0000020303000000")


def test_icresp_golden() -> None:
    pdu = ICResp(maxh2cdata=131072).to_bytes()
    assert bytes(pdu[:8]) == bytes.fromhex("0100800080000000")
    assert bytes(pdu[8:16]) == bytes.fromhex("0000000000000200")
    assert bytes(pdu[16:]) == bytes(112)


def test_crc32c_golden() -> None:
    assert crc32c_of([b"123456789"]) == 0xE3069283
    assert pack_digest(0xE3069283) == bytes.fromhex("839206E3")
    assert crc32c_of([b"1234", memoryview(b"56789"), bytearray()]) == 0xE3069283
    assert unpack_digest(bytes.fromhex("839206E3")) == 0xE3069283


@given(st.lists(st.binary(max_size=64), max_size=6))
def test_crc32c_of_is_incremental(parts: list[bytes]) -> None:
    assert crc32c_of(parts) == crc32c.crc32c(b"".join(parts))


@given(u8, u8, u8, u8, u32)
def test_common_header_round_trip(t: int, flags: int, hlen: int, pdo: int, plen: int) -> None:
    ch = CommonHeader(t, flags, hlen, pdo, plen)
    buf = bytearray(12)
    ch.pack_into(buf, 4)
    assert bytes(buf[4:]) == struct.pack("<BBBBI", t, flags, hlen, pdo, plen)
    assert CommonHeader.unpack_from(buf, 4) == ch


@given(u16, u8, st.booleans(), st.booleans(), u32)
def test_icreq_round_trip(pfv: int, hpda: int, hd: bool, dd: bool, maxr2t: int) -> None:
    rec = ICReq(pfv, hpda, hd, dd, maxr2t)
    assert ICReq.unpack_from(rec.to_bytes()) == rec


@given(u16, u8, st.booleans(), st.booleans(), u32)
def test_icresp_round_trip(pfv: int, cpda: int, hd: bool, dd: bool, maxh2c: int) -> None:
    rec = ICResp(pfv, cpda, hd, dd, maxh2c)
    assert ICResp.unpack_from(rec.to_bytes()) == rec


@given(
    u16, u32, st.binary(max_size=200), st.sampled_from([PduType.H2C_TERM_REQ, PduType.C2H_TERM_REQ])
)
def test_term_req_round_trip(fes: int, fei: int, offending: bytes, t: PduType) -> None:
    rec = TermReq(fes, fei)
    pdu = rec.to_bytes(t, offending)
    ch = CommonHeader.unpack_from(pdu)
    assert ch == CommonHeader(t, 0, 24, 0, 24 + min(len(offending), 128))
    assert len(pdu) == ch.plen
    assert TermReq.unpack_from(pdu) == rec
    assert bytes(pdu[24:]) == offending[:128]
    assert bytes(pdu[14:24]) == bytes(10)


@given(u16, u16, u32, u32)
def test_xfer_headers_round_trip(cccid: int, ttag: int, off: int, length: int) -> None:
    buf = bytearray(24)
    for rec in (R2T(cccid, ttag, off, length), H2CDataHeader(cccid, ttag, off, length)):
        rec.pack_into(buf)
        assert type(rec).unpack_from(buf) == rec
        assert struct.unpack_from("<HHII", buf, 8) == (cccid, ttag, off, length)
    buf = bytearray(b"\xff" * 24)
    c2h = C2HDataHeader(cccid, off, length)
    c2h.pack_into(buf)
    assert C2HDataHeader.unpack_from(buf) == c2h
    assert bytes(buf[10:12]) == b"\0\0"


@given(st.binary(min_size=64, max_size=64), st.binary(min_size=16, max_size=16))
def test_capsule_headers_round_trip(sqe: bytes, cqe: bytes) -> None:
    cmd = build_header(CapsuleCmdHeader(sqe))
    assert len(cmd) == 72
    assert CapsuleCmdHeader.unpack_from(cmd) == CapsuleCmdHeader(sqe)
    resp = build_header(CapsuleRespHeader(cqe))
    assert len(resp) == 24
    assert CapsuleRespHeader.unpack_from(resp).cqe == cqe


@given(
    st.integers(1, 1 << 20),
    st.booleans(),
    st.booleans(),
    st.integers(0, 31),
    st.sampled_from([0, PduFlags.LAST_PDU, PduFlags.LAST_PDU | PduFlags.SUCCESS]),
)
def test_build_header_data_pdu(datal: int, hd: bool, dd: bool, pda: int, flags: int) -> None:
    rec = C2HDataHeader(7, 0, datal)
    hdr = build_header(
        rec, flags=flags, header_digest=hd, data_length=datal, data_digest=dd, pda=pda
    )
    ch = CommonHeader.unpack_from(hdr)
    assert ch.pdu_type == PduType.C2H_DATA
    assert ch.hlen == 24
    assert ch.pdo == len(hdr) == data_offset(24, hd, pda)
    assert ch.pdo % ((pda + 1) * 4) == 0
    assert ch.pdo >= 24 + 4 * hd
    assert ch.plen == ch.pdo + datal + 4 * dd
    assert ch.flags == flags | (PduFlags.HDGSTF if hd else 0) | (PduFlags.DDGSTF if dd else 0)
    if hd:
        assert unpack_digest(hdr, 24) == crc32c.crc32c(bytes(hdr[:24]))
    assert bytes(hdr[24 + 4 * hd :]) == bytes(len(hdr) - 24 - 4 * hd)  # zero pad
    assert C2HDataHeader.unpack_from(hdr) == rec


def test_build_header_no_data() -> None:
    hdr = build_header(R2T(1, 2, 3, 4), header_digest=True, data_digest=True, pda=5)
    ch = CommonHeader.unpack_from(hdr)
    assert ch == CommonHeader(PduType.R2T, PduFlags.HDGSTF, 24, 0, 28)
    assert len(hdr) == 28
    # never digested: IC PDUs ignore header_digest
    ic = build_header(ICReq(), header_digest=True)
    assert len(ic) == 128
    assert ic[1] == 0


@given(
    cccid=st.integers(0, 0xFFFF),
    datao=st.integers(0, 2**32 - 1),
    datal=st.integers(1, 2**20),
    flags=st.sampled_from([0, PduFlags.LAST_PDU, PduFlags.LAST_PDU | PduFlags.SUCCESS]),
    hd=st.booleans(),
    dd=st.booleans(),
    pda=st.integers(0, 31),
)
# The plain connection (no digests, no padding) has its own one-pack paths: always try it.
@example(cccid=7, datao=0, datal=4096, flags=PduFlags.LAST_PDU, hd=False, dd=False, pda=0)
@example(cccid=7, datao=0, datal=9000, flags=0, hd=False, dd=True, pda=0)
@example(cccid=0xFFFF, datao=8192, datal=1, flags=0, hd=False, dd=False, pda=0)
def test_lean_headers_equal_the_record_built_ones(
    cccid: int, datao: int, datal: int, flags: int, hd: bool, dd: bool, pda: int
) -> None:
    """The per-PDU send paths pack without records; the bytes must be build_header's."""
    assert c2h_data_header(
        cccid, datao, datal, flags=flags, header_digest=hd, data_digest=dd, pda=pda
    ) == build_header(
        C2HDataHeader(cccid, datao, datal),
        flags=flags,
        header_digest=hd,
        data_length=datal,
        data_digest=dd,
        pda=pda,
    )
    cqe = memoryview(bytes(range(16)))
    assert capsule_resp_header(cqe, header_digest=hd) == build_header(
        CapsuleRespHeader(cqe), header_digest=hd
    )
    sqe = memoryview(bytes(range(64)))
    assert capsule_cmd_header(
        sqe, header_digest=hd, data_length=datal % 9000, data_digest=dd, pda=pda
    ) == build_header(
        CapsuleCmdHeader(sqe),
        header_digest=hd,
        data_length=datal % 9000,
        data_digest=dd,
        pda=pda,
    )
