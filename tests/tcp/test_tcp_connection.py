"""Sans-IO NVMe/TCP connections: host/controller pairs pumped in memory, malformed input, fuzz."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmeof.errors import PduError, ProtocolError
from nvmeof.tcp.connection import (
    CONTROLLER_TRANSITIONS,
    HOST_TRANSITIONS,
    CommandReceived,
    ConnectionClosed,
    ConnectionParams,
    ConnectionState,
    ControllerConnection,
    DataDigestError,
    DataReceived,
    Event,
    HostConnection,
    ICReqReceived,
    ICRespReceived,
    R2TReceived,
    ResponseReceived,
    TermReqReceived,
)
from nvmeof.tcp.pdu import (
    R2T,
    Buffer,
    C2HDataHeader,
    CapsuleCmdHeader,
    CommonHeader,
    FatalErrorStatus,
    H2CDataHeader,
    ICReq,
    ICResp,
    PduFlags,
    PduType,
    TermReq,
    build_header,
    crc32c_of,
    pack_digest,
)

FES = FatalErrorStatus
MODES = ["bulk", "bytewise", "chunks"]
KiB = 1024
MiB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------------
def make_sqe(cid: int, opcode: int = 0x01) -> bytearray:
    sqe = bytearray(64)
    sqe[0] = opcode
    sqe[2:4] = cid.to_bytes(2, "little")
    sqe[40:44] = b"\xaa\xbb\xcc\xdd"
    return sqe


def make_cqe(cid: int, dw0: int = 0) -> bytearray:
    cqe = bytearray(16)
    cqe[0:4] = dw0.to_bytes(4, "little")
    cqe[12:14] = cid.to_bytes(2, "little")
    return cqe


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(251))
    return (block * (n // 251 + 1))[:n]


def drain(conn: HostConnection | ControllerConnection) -> list[Event]:
    out: list[Event] = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def joined(bufs: list[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def chunk_sizes() -> Iterator[int]:
    return itertools.cycle([1, 7, 100, 4096, 3, 65537, 24, 333333])


def feed(conn: HostConnection | ControllerConnection, data: bytes, mode: str) -> None:
    if mode == "bulk":
        conn.receive_data(data)
    elif mode == "bytewise":
        for i in range(len(data)):
            if conn.state is ConnectionState.CLOSED:  # the peer's TermReq: stop reading
                break
            conn.receive_data(data[i : i + 1])
    else:
        pos = 0
        for size in chunk_sizes():
            if pos >= len(data) or conn.state is ConnectionState.CLOSED:
                break
            conn.receive_data(data[pos : pos + size])
            pos += size


def transfer(
    src: HostConnection | ControllerConnection,
    dst: HostConnection | ControllerConnection,
    mode: str = "bulk",
) -> list[Event]:
    feed(dst, joined(src.data_to_send()), mode)
    return drain(dst)


def connect(
    mode: str = "bulk",
    *,
    header_digest: bool = False,
    data_digest: bool = False,
    hpda: int = 0,
    cpda: int = 0,
    maxh2cdata: int = 131072,
    max_c2h_data: int = 131072,
    max_in_capsule_data: int = 8192,
) -> tuple[HostConnection, ControllerConnection]:
    host = HostConnection(header_digest=header_digest, data_digest=data_digest, hpda=hpda)
    ctrl = ControllerConnection(
        cpda=cpda,
        maxh2cdata=maxh2cdata,
        max_c2h_data=max_c2h_data,
        max_in_capsule_data=max_in_capsule_data,
    )
    host.initiate()
    assert host.state is ConnectionState.AWAIT_ICRESP
    params = ConnectionParams(header_digest, data_digest, cpda, hpda, maxh2cdata, 0)
    assert transfer(host, ctrl, mode) == [ICReqReceived(params)]
    assert transfer(ctrl, host, mode) == [ICRespReceived(params)]
    assert host.params == ctrl.params == params
    assert host.state is ctrl.state is ConnectionState.READY
    return host, ctrl


def ready_controller(
    *,
    header_digest: bool = False,
    data_digest: bool = False,
    cpda: int = 0,
    maxh2cdata: int = 131072,
) -> ControllerConnection:
    ctrl = ControllerConnection(cpda=cpda, maxh2cdata=maxh2cdata)
    ctrl.receive_data(ICReq(header_digest=header_digest, data_digest=data_digest).to_bytes())
    assert isinstance(ctrl.next_event(), ICReqReceived)
    ctrl.data_to_send()
    return ctrl


def ready_host(
    *, header_digest: bool = False, data_digest: bool = False, hpda: int = 0
) -> HostConnection:
    host = HostConnection(header_digest=header_digest, data_digest=data_digest, hpda=hpda)
    host.initiate()
    host.data_to_send()
    host.receive_data(ICResp(header_digest=header_digest, data_digest=data_digest).to_bytes())
    assert isinstance(host.next_event(), ICRespReceived)
    return host


def expect_pdu_error(
    conn: HostConnection | ControllerConnection,
    data: bytes,
    fes: int,
    fei: int,
    offending: bytes,
    mode: str = "bulk",
) -> None:
    """Feeding ``data`` raises PduError(fes, fei) with exactly one TermReq queued carrying
    ``offending`` (the offending header bytes)."""
    with pytest.raises(PduError) as info:
        feed(conn, data, mode)
    assert (info.value.fes, info.value.fei) == (fes, fei)
    assert conn.state is ConnectionState.ERROR
    out = joined(conn.data_to_send())
    term_type = PduType.H2C_TERM_REQ if isinstance(conn, HostConnection) else PduType.C2H_TERM_REQ
    ch = CommonHeader.unpack_from(out)
    assert ch == CommonHeader(term_type, 0, 24, 0, len(out))
    assert TermReq.unpack_from(out) == TermReq(fes, fei)
    assert out[24:] == offending
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\0")
    with pytest.raises(ProtocolError):
        conn.wants()


def capsule(
    cid: int,
    data: bytes = b"",
    *,
    header_digest: bool = False,
    data_digest: bool = False,
    pda: int = 0,
) -> bytes:
    hdr = build_header(
        CapsuleCmdHeader(make_sqe(cid)),
        header_digest=header_digest,
        data_length=len(data),
        data_digest=data_digest,
        pda=pda,
    )
    digest = pack_digest(crc32c_of([data])) if data and data_digest else b""
    return bytes(hdr) + data + digest


def h2c(cid: int, ttag: int, datao: int, data: bytes, *, flags: int = PduFlags.LAST_PDU) -> bytes:
    hdr = build_header(
        H2CDataHeader(cid, ttag, datao, len(data)), flags=flags, data_length=len(data)
    )
    return bytes(hdr) + data


def c2h(cid: int, datao: int, data: bytes, *, flags: int = PduFlags.LAST_PDU) -> bytes:
    hdr = build_header(C2HDataHeader(cid, datao, len(data)), flags=flags, data_length=len(data))
    return bytes(hdr) + data


# -- happy paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("hd", "dd"), [(False, False), (True, False), (False, True), (True, True)])
def test_ic_exchange(mode: str, hd: bool, dd: bool) -> None:
    host, ctrl = connect(mode, header_digest=hd, data_digest=dd)
    assert host.data_to_send() == []
    assert ctrl.data_to_send() == []


def test_ic_exchange_wire_bytes() -> None:
    host = HostConnection()
    host.initiate()
    icreq = joined(host.data_to_send())
    assert icreq[:8] == bytes.fromhex("0000800080000000")
    assert len(icreq) == 128
    ctrl = ControllerConnection(maxh2cdata=131072)
    ctrl.receive_data(icreq)
    icresp = joined(ctrl.data_to_send())
    assert icresp[:16] == bytes.fromhex("01008000800000000000000000000200")


def test_controller_declines_digests() -> None:
    host = HostConnection(header_digest=True, data_digest=True)
    ctrl = ControllerConnection(allow_digests=False)
    host.initiate()
    transfer(host, ctrl)
    [ev] = transfer(ctrl, host)
    assert isinstance(ev, ICRespReceived)
    assert not ev.params.header_digest
    assert not ev.params.data_digest


def test_transition_tables_cover_term_req() -> None:
    assert (ConnectionState.READY, PduType.C2H_TERM_REQ) in HOST_TRANSITIONS
    assert (ConnectionState.READY, PduType.H2C_TERM_REQ) in CONTROLLER_TRANSITIONS
    assert (ConnectionState.AWAIT_ICREQ, PduType.CAPSULE_CMD) not in CONTROLLER_TRANSITIONS


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("hd", "dd"), [(False, False), (True, True)])
def test_command_without_data(mode: str, hd: bool, dd: bool) -> None:
    host, ctrl = connect(mode, header_digest=hd, data_digest=dd)
    host.send_command(make_sqe(5))
    wire = joined(host.data_to_send())
    ch = CommonHeader.unpack_from(wire)
    assert ch.pdo == 0
    assert ch.plen == 72 + 4 * hd == len(wire)
    assert ch.flags == (PduFlags.HDGSTF if hd else 0)  # no DDGSTF without data
    ctrl.receive_data(wire) if mode == "bulk" else feed(ctrl, wire, mode)
    [ev] = drain(ctrl)
    assert isinstance(ev, CommandReceived)
    assert bytes(ev.sqe) == make_sqe(5)
    assert ev.data is None
    ctrl.send_response(make_cqe(5, dw0=0x1234))
    [resp] = transfer(ctrl, host, mode)
    assert isinstance(resp, ResponseReceived)
    assert bytes(resp.cqe) == make_cqe(5, dw0=0x1234)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("hd", "dd", "cpda"), [(False, False, 0), (True, True, 0), (True, True, 3)]
)
def test_in_capsule_write(mode: str, hd: bool, dd: bool, cpda: int) -> None:
    host, ctrl = connect(mode, header_digest=hd, data_digest=dd, cpda=cpda)
    parts: list[Buffer] = [b"hello ", bytearray(pattern(3000)), memoryview(pattern(5000, 3))]
    host.send_command(make_sqe(9), in_capsule=parts)
    out = host.data_to_send()
    ch = CommonHeader.unpack_from(out[0])
    assert ch.pdo == len(out[0])
    assert ch.pdo % ((cpda + 1) * 4) == 0
    assert ch.pdo >= 72 + 4 * hd
    assert ch.plen == ch.pdo + 8006 + 4 * dd
    # the payload views are the caller's buffers, untouched
    sent1, sent2, src2 = out[2], out[3], parts[2]
    assert isinstance(sent1, memoryview)
    assert isinstance(sent2, memoryview)
    assert isinstance(src2, memoryview)
    assert sent1.obj is parts[1]
    assert sent2.obj is src2.obj
    feed(ctrl, joined(out), mode)
    [ev] = drain(ctrl)
    assert isinstance(ev, CommandReceived)
    assert ev.data is not None
    assert bytes(ev.data) == b"".join(bytes(p) for p in parts)
    assert bytes(ev.sqe) == make_sqe(9)


def run_r2t_write(
    mode: str, size: int, maxh2cdata: int, *, hd: bool = False, dd: bool = False, cpda: int = 0
) -> None:
    host, ctrl = connect(mode, header_digest=hd, data_digest=dd, cpda=cpda, maxh2cdata=maxh2cdata)
    data = pattern(size, 1)
    write: list[Buffer] = [
        data[: size // 3],
        bytearray(data[size // 3 : size // 2]),
        memoryview(data[size // 2 :]),
    ]
    host.send_command(make_sqe(17, opcode=0x01), write=write)
    [ev] = transfer(host, ctrl, mode)
    assert isinstance(ev, CommandReceived)
    dest = bytearray(size)
    ctrl.request_data(17, memoryview(dest))
    r2t_wire = joined(ctrl.data_to_send())
    assert R2T.unpack_from(r2t_wire).r2tl == size
    feed(host, r2t_wire, mode)
    [r2t_ev] = drain(host)
    assert isinstance(r2t_ev, R2TReceived)
    assert (r2t_ev.cccid, r2t_ev.offset, r2t_ev.length) == (17, 0, size)
    out = host.data_to_send()
    # walk the H2CData PDUs: offsets contiguous, <= maxh2cdata, LAST_PDU only on the last
    wire = joined(out)
    pos, expect_off, count = 0, 0, 0
    while pos < len(wire):
        ch = CommonHeader.unpack_from(wire, pos)
        hdr = H2CDataHeader.unpack_from(wire, pos)
        assert ch.pdu_type == PduType.H2C_DATA
        assert hdr.ttag == r2t_ev.ttag
        assert hdr.datao == expect_off
        assert 0 < hdr.datal <= maxh2cdata
        assert ch.pdo % ((cpda + 1) * 4) == 0
        expect_off += hdr.datal
        assert bool(ch.flags & PduFlags.LAST_PDU) == (expect_off == size)
        pos += ch.plen
        count += 1
    assert expect_off == size
    assert count == -(-size // maxh2cdata)
    # payload items are views of the caller's buffers (zero copy)
    assert all(isinstance(b, memoryview) for b in out if not isinstance(b, bytearray | bytes))
    feed(ctrl, wire, mode)
    assert drain(ctrl) == [DataReceived(17)]
    assert dest == data
    ctrl.send_response(make_cqe(17))
    [resp] = transfer(ctrl, host, mode)
    assert isinstance(resp, ResponseReceived)


@pytest.mark.parametrize(("hd", "dd"), [(False, False), (True, True)])
def test_r2t_write_1mib(hd: bool, dd: bool) -> None:
    run_r2t_write("bulk", MiB, 128 * KiB, hd=hd, dd=dd)


def test_r2t_write_1mib_chunks() -> None:
    run_r2t_write("chunks", MiB, 128 * KiB, hd=True, dd=True, cpda=2)


@pytest.mark.parametrize(("hd", "dd", "cpda"), [(False, False, 0), (True, True, 1)])
def test_r2t_write_bytewise(hd: bool, dd: bool, cpda: int) -> None:
    run_r2t_write("bytewise", 20000, 4096, hd=hd, dd=dd, cpda=cpda)


def run_read(
    mode: str,
    sizes: list[int],
    max_c2h: int,
    *,
    success: bool,
    hd: bool = False,
    dd: bool = False,
    hpda: int = 0,
) -> None:
    host, ctrl = connect(mode, header_digest=hd, data_digest=dd, hpda=hpda, max_c2h_data=max_c2h)
    total = sum(sizes)
    bufs = [bytearray(n) for n in sizes]
    host.send_command(make_sqe(33, opcode=0x02), read_into=[memoryview(b) for b in bufs])
    [ev] = transfer(host, ctrl, mode)
    assert isinstance(ev, CommandReceived)
    data = pattern(total, 5)
    src = [memoryview(data)[:1000], memoryview(data)[1000:]]
    ctrl.send_data(33, src, success=success)
    out = ctrl.data_to_send()
    wire = joined(out)
    pos, expect_off = 0, 0
    while pos < len(wire):
        ch = CommonHeader.unpack_from(wire, pos)
        hdr = C2HDataHeader.unpack_from(wire, pos)
        assert ch.pdu_type == PduType.C2H_DATA
        assert hdr.datao == expect_off
        assert ch.pdo % ((hpda + 1) * 4) == 0
        assert ch.pdo >= 24 + 4 * hd
        assert 0 < hdr.datal <= max_c2h
        expect_off += hdr.datal
        last = expect_off == total
        assert bool(ch.flags & PduFlags.LAST_PDU) == last
        assert bool(ch.flags & PduFlags.SUCCESS) == (last and success)
        pos += ch.plen
    assert expect_off == total
    feed(host, wire, mode)
    events = drain(host)
    assert b"".join(bufs) == data
    if success:
        [resp] = events
        assert isinstance(resp, ResponseReceived)
        assert bytes(resp.cqe) == bytes(make_cqe(33))
    else:
        assert events == []
        ctrl.send_response(make_cqe(33, dw0=7))
        [resp] = transfer(ctrl, host, mode)
        assert isinstance(resp, ResponseReceived)
        assert bytes(resp.cqe) == make_cqe(33, dw0=7)
    # the registration is gone once the command completed
    if not hd and not dd:
        with pytest.raises(PduError) as info:
            host.receive_data(c2h(33, 0, b"x"))
        assert info.value.fei == 8


@pytest.mark.parametrize("success", [False, True])
@pytest.mark.parametrize(("hd", "dd"), [(False, False), (True, True)])
def test_read_1mib_into_three_views(success: bool, hd: bool, dd: bool) -> None:
    run_read("bulk", [300_000, 400_000, MiB - 700_000], 128 * KiB, success=success, hd=hd, dd=dd)


def test_read_1mib_chunks_padded() -> None:
    run_read("chunks", [300_000, 400_000, MiB - 700_000], 100_000, success=True, hd=True,
             dd=True, hpda=5)  # fmt: skip


@pytest.mark.parametrize("success", [False, True])
def test_read_bytewise(success: bool) -> None:
    run_read("bytewise", [3000, 5, 9000], 4000, success=success, hd=True, dd=True, hpda=2)


def test_large_payload_lands_directly_in_destination() -> None:
    host, ctrl = connect()
    dest = bytearray(MiB)
    host.send_command(make_sqe(1), read_into=[memoryview(dest)])
    transfer(host, ctrl)
    ctrl.send_data(1, [pattern(MiB)])
    wire = joined(ctrl.data_to_send())
    # deliver the first PDU header alone; the next wants() must point into `dest`
    host.receive_data(wire[:24])
    view = host.wants()
    assert view.obj is dest
    assert len(view) == 128 * KiB  # never beyond the current PDU's payload
    view[:] = wire[24 : 24 + len(view)]
    host.received(len(view))
    host.receive_data(wire[24 + 128 * KiB :])
    assert dest == pattern(MiB)


def test_in_buffer_payload_is_copied_then_direct() -> None:
    host, ctrl = connect()
    dest = bytearray(200_000)
    host.send_command(make_sqe(1), read_into=[memoryview(dest)])
    transfer(host, ctrl)
    ctrl.send_data(1, [pattern(200_000)])
    wire = joined(ctrl.data_to_send())
    view = host.wants()  # the internal buffer: header plus part of the payload land there
    view[:1000] = wire[:1000]
    host.received(1000)
    view = host.wants()
    assert view.obj is dest
    assert len(view) == 131072 - 976
    host.receive_data(wire[1000:])
    assert dest == pattern(200_000)


def test_many_pdus_from_one_receive() -> None:
    host, ctrl = connect()
    for cid in range(50):
        host.send_command(make_sqe(cid), in_capsule=[pattern(100, cid)])
    wire = joined(host.data_to_send())
    view = ctrl.wants()
    assert len(view) >= len(wire)
    view[: len(wire)] = wire
    ctrl.received(len(wire))
    events = drain(ctrl)
    assert len(events) == 50
    for cid, ev in enumerate(events):
        assert isinstance(ev, CommandReceived)
        assert ev.data is not None
        assert bytes(ev.data) == pattern(100, cid)


def test_pipelined_writes_interleaved() -> None:
    host, ctrl = connect(maxh2cdata=4096)
    data = {cid: pattern(10_000, cid) for cid in (1, 2)}
    for cid, d in data.items():
        host.send_command(make_sqe(cid), write=[d])
    transfer(host, ctrl)
    dest = {cid: bytearray(10_000) for cid in data}
    for cid in data:
        ctrl.request_data(cid, memoryview(dest[cid]))
    r2ts = transfer(ctrl, host)
    assert [type(e) for e in r2ts] == [R2TReceived, R2TReceived]
    assert r2ts[0].ttag != r2ts[1].ttag  # type: ignore[union-attr]
    assert transfer(host, ctrl) == [DataReceived(1), DataReceived(2)]
    assert dest[1] == data[1]
    assert dest[2] == data[2]


def test_partial_r2t_windows() -> None:
    """The host answers R2Ts for sub-ranges of its write data (an SPDK-style controller)."""
    host = ready_host()
    data = pattern(10_000)
    host.send_command(make_sqe(4), write=[data])
    host.data_to_send()
    host.receive_data(bytes(build_header(R2T(4, 9, 5000, 5000))))
    [ev] = drain(host)
    assert ev == R2TReceived(4, 9, 5000, 5000)
    wire = joined(host.data_to_send())
    hdr = H2CDataHeader.unpack_from(wire)
    assert hdr == H2CDataHeader(4, 9, 5000, 5000)
    assert wire[24:] == data[5000:]


def test_eof_clean_and_unclean() -> None:
    host, ctrl = connect()
    ctrl.receive_data(b"")
    assert drain(ctrl) == [ConnectionClosed(clean=True)]
    assert ctrl.state is ConnectionState.CLOSED
    with pytest.raises(ProtocolError):
        ctrl.received(0)
    host, ctrl = connect()
    host.send_command(make_sqe(1), in_capsule=[b"abcd"])
    wire = joined(host.data_to_send())
    ctrl.receive_data(wire[:-1])
    ctrl.receive_data(b"")
    assert drain(ctrl) == [ConnectionClosed(clean=False)]


def test_truncated_header_then_eof() -> None:
    ctrl = ControllerConnection()
    ctrl.receive_data(ICReq().to_bytes()[:50])
    ctrl.received(0)
    assert drain(ctrl) == [ConnectionClosed(clean=False)]


def test_term_req_received() -> None:
    host, ctrl = connect()
    ctrl.send_term_req(FES.UNSUPPORTED_PARAMETER, 44)
    assert ctrl.state is ConnectionState.ERROR
    wire = joined(ctrl.data_to_send())
    assert wire == bytes(TermReq(6, 44).to_bytes(PduType.C2H_TERM_REQ))
    host.receive_data(wire + b"trailing garbage")
    assert drain(host) == [TermReqReceived(6, 44)]
    assert host.state is ConnectionState.CLOSED
    assert host.data_to_send() == []  # never answered with our own TermReq
    with pytest.raises(ProtocolError):
        host.receive_data(b"x")


def test_term_req_with_offending_header_received_bytewise() -> None:
    ctrl = ready_controller()
    wire = bytes(
        TermReq(FES.PDU_SEQUENCE_ERROR, 0).to_bytes(PduType.H2C_TERM_REQ, bytes(range(128)))
    )
    feed(ctrl, wire, "bytewise")
    assert drain(ctrl) == [TermReqReceived(2, 0)]
    assert ctrl.data_to_send() == []


def test_term_req_before_icreq() -> None:
    ctrl = ControllerConnection()
    ctrl.receive_data(bytes(TermReq(2).to_bytes(PduType.H2C_TERM_REQ)))
    assert drain(ctrl) == [TermReqReceived(2, 0)]


def test_forget_makes_later_pdus_fatal() -> None:
    host = ready_host()
    host.send_command(make_sqe(3), read_into=[memoryview(bytearray(10))])
    host.forget(3)
    host.data_to_send()
    wire = c2h(3, 0, b"abc")
    expect_pdu_error(host, wire, FES.INVALID_HEADER_FIELD, 8, wire[:24])


def test_set_max_in_capsule_data() -> None:
    ctrl = ready_controller()
    ctrl.set_max_in_capsule_data(16 * KiB)
    ctrl.receive_data(capsule(1, pattern(16 * KiB)))
    [ev] = drain(ctrl)
    assert isinstance(ev, CommandReceived)
    assert ev.data is not None
    assert len(ev.data) == 16 * KiB


def test_misuse_raises() -> None:
    host = HostConnection()
    with pytest.raises(ProtocolError):
        host.send_command(make_sqe(1))
    host, ctrl = connect()
    with pytest.raises(ValueError, match="SQE"):
        host.send_command(b"short")
    host.send_command(make_sqe(1), write=[b"abc"])
    with pytest.raises(ProtocolError):
        host.send_command(make_sqe(1), write=[b"abc"])
    with pytest.raises(ValueError, match="CQE"):
        ctrl.send_response(b"x")
    with pytest.raises(ValueError, match="at least one byte"):
        ctrl.send_data(1, [])
    ctrl.request_data(1, memoryview(bytearray(3)))
    with pytest.raises(ProtocolError):
        ctrl.request_data(1, memoryview(bytearray(3)))
    with pytest.raises(ValueError, match="wants"):
        ctrl.received(10**9)


# -- data digest errors: not fatal -----------------------------------------------------------------
def test_bad_in_capsule_data_digest() -> None:
    ctrl = ready_controller(data_digest=True)
    good = capsule(7, b"payload!", data_digest=True)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    ctrl.receive_data(bad)
    assert drain(ctrl) == [DataDigestError(7)]
    assert ctrl.state is ConnectionState.READY
    ctrl.receive_data(good)
    [ev] = drain(ctrl)
    assert isinstance(ev, CommandReceived)


def test_bad_h2c_data_digest() -> None:
    host, ctrl = connect(data_digest=True, maxh2cdata=4096)
    host.send_command(make_sqe(2), write=[pattern(10_000)])
    transfer(host, ctrl)
    ctrl.request_data(2, memoryview(bytearray(10_000)))
    transfer(ctrl, host)
    wire = bytearray(joined(host.data_to_send()))
    wire[30] ^= 0xFF  # inside the first PDU's data
    ctrl.receive_data(wire)
    assert drain(ctrl) == [DataDigestError(2)]  # instead of DataReceived, once
    assert ctrl.state is ConnectionState.READY


def test_bad_c2h_data_digest() -> None:
    host, ctrl = connect(data_digest=True)
    dest = bytearray(100)
    host.send_command(make_sqe(2), read_into=[memoryview(dest)])
    transfer(host, ctrl)
    ctrl.send_data(2, [pattern(100)], success=True)
    wire = bytearray(joined(ctrl.data_to_send()))
    wire[-1] ^= 0xFF
    host.receive_data(wire)
    events = drain(host)
    assert events[0] == DataDigestError(2)
    assert isinstance(events[1], ResponseReceived)
    assert host.state is ConnectionState.READY


# -- malformed input: fatal ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bulk", "bytewise"])
def test_wrong_hlen(mode: str) -> None:
    ctrl = ready_controller()
    bad = bytearray(capsule(1))
    bad[2] = 24
    expect_pdu_error(ctrl, bytes(bad), FES.INVALID_HEADER_FIELD, 2, bytes(bad[:8]), mode)


@pytest.mark.parametrize("mode", ["bulk", "bytewise"])
@pytest.mark.parametrize("plen", [0, 1, 7, 8, 71, 73])
def test_wrong_plen_capsule(mode: str, plen: int) -> None:
    ctrl = ready_controller()
    bad = bytearray(capsule(1))
    struct.pack_into("<I", bad, 4, plen)
    if plen == 73:  # claims 1 byte of data but PDO is 0
        expect_pdu_error(ctrl, bytes(bad), FES.INVALID_HEADER_FIELD, 3, bytes(bad[:8]), mode)
    else:
        expect_pdu_error(ctrl, bytes(bad), FES.INVALID_HEADER_FIELD, 4, bytes(bad[:8]), mode)


@pytest.mark.parametrize("plen", [0, 4, 8, 127, 129])
def test_wrong_plen_icreq(plen: int) -> None:
    ctrl = ControllerConnection()
    bad = bytearray(ICReq().to_bytes())
    struct.pack_into("<I", bad, 4, plen)
    expect_pdu_error(ctrl, bytes(bad), FES.INVALID_HEADER_FIELD, 4, bytes(bad[:8]), "bytewise")


def test_zero_plen_header_does_not_spin() -> None:
    """The ceph-nvmeof anti-example: a PLEN=0 header of an unknown type."""
    ctrl = ready_controller()
    expect_pdu_error(ctrl, bytes(8), FES.PDU_SEQUENCE_ERROR, 0, bytes(8), "bytewise")
    ctrl = ready_controller()
    hdr = bytes([0x0A, 0, 0, 0, 0, 0, 0, 0])
    expect_pdu_error(ctrl, hdr * 100, FES.INVALID_HEADER_FIELD, 0, hdr)


@pytest.mark.parametrize("ptype", [0x08, 0x0A, 0x7F, 0xFF, PduType.C2H_DATA, PduType.R2T])
def test_unknown_pdu_type_controller(ptype: int) -> None:
    ctrl = ready_controller()
    bad = bytes([ptype, 0, 24, 0, 24, 0, 0, 0]) + bytes(16)
    expect_pdu_error(ctrl, bad, FES.INVALID_HEADER_FIELD, 0, bad[:8])


@pytest.mark.parametrize("ptype", [0x08, 0x0A, PduType.CAPSULE_CMD, PduType.H2C_DATA])
def test_unknown_pdu_type_host(ptype: int) -> None:
    host = ready_host()
    bad = bytes([ptype, 0, 24, 0, 24, 0, 0, 0]) + bytes(16)
    expect_pdu_error(host, bad, FES.INVALID_HEADER_FIELD, 0, bad[:8])


def test_bad_header_digest() -> None:
    ctrl = ready_controller(header_digest=True)
    bad = bytearray(capsule(1, header_digest=True))
    bad[75] ^= 0x01
    expect_pdu_error(ctrl, bytes(bad), FES.HEADER_DIGEST_ERROR, 0, bytes(bad[:76]), "bytewise")


def test_bad_header_digest_host() -> None:
    host = ready_host(header_digest=True)
    bad = bytearray(build_header(R2T(1, 1, 0, 10), header_digest=True))
    bad[10] ^= 0x01
    expect_pdu_error(host, bytes(bad), FES.HEADER_DIGEST_ERROR, 0, bytes(bad))


def test_missing_header_digest_flag() -> None:
    ctrl = ready_controller(header_digest=True)
    plain = capsule(1)
    expect_pdu_error(ctrl, plain, FES.INVALID_HEADER_FIELD, 1, plain[:8])


def test_unexpected_header_digest_flag() -> None:
    host = ready_host()
    wire = bytes(build_header(R2T(1, 1, 0, 10), header_digest=True))
    expect_pdu_error(host, wire, FES.INVALID_HEADER_FIELD, 1, wire[:8])


def test_missing_data_digest_flag() -> None:
    ctrl = ready_controller(data_digest=True)
    plain = capsule(1, b"data")
    expect_pdu_error(ctrl, plain, FES.INVALID_HEADER_FIELD, 1, plain[:8])


def test_reserved_flag_bits() -> None:
    ctrl = ready_controller()
    bad = bytearray(capsule(1))
    bad[1] = 0x40
    expect_pdu_error(ctrl, bytes(bad), FES.INVALID_HEADER_FIELD, 1, bytes(bad[:8]))


def test_capsule_before_icreq() -> None:
    ctrl = ControllerConnection()
    wire = capsule(1)
    expect_pdu_error(ctrl, wire, FES.PDU_SEQUENCE_ERROR, 0, wire[:8])


def test_second_icreq() -> None:
    ctrl = ready_controller()
    wire = bytes(ICReq().to_bytes())
    expect_pdu_error(ctrl, wire, FES.PDU_SEQUENCE_ERROR, 0, wire[:8])


def test_icresp_before_initiate_is_sequence_error() -> None:
    host = HostConnection()
    wire = bytes(ICResp().to_bytes())
    expect_pdu_error(host, wire, FES.PDU_SEQUENCE_ERROR, 0, wire[:8])


def test_capsule_resp_before_icresp() -> None:
    host = HostConnection()
    host.initiate()
    host.data_to_send()
    wire = bytes(build_header(R2T(1, 1, 0, 1)))
    expect_pdu_error(host, wire, FES.PDU_SEQUENCE_ERROR, 0, wire[:8])


@pytest.mark.parametrize(("offset", "value", "fei"), [(8, 1, 8), (10, 32, 10)])
def test_icreq_bad_fields(offset: int, value: int, fei: int) -> None:
    ctrl = ControllerConnection()
    bad = bytearray(ICReq().to_bytes())
    bad[offset] = value
    expect_pdu_error(ctrl, bytes(bad), FES.INVALID_HEADER_FIELD, fei, bytes(bad))


def test_icreq_with_pdo() -> None:
    ctrl = ControllerConnection()
    bad = bytearray(ICReq().to_bytes())
    bad[3] = 8
    expect_pdu_error(ctrl, bytes(bad), FES.INVALID_HEADER_FIELD, 3, bytes(bad[:8]))


@pytest.mark.parametrize(
    ("resp", "fei"),
    [
        (ICResp(pfv=1), 8),
        (ICResp(cpda=32), 10),
        (ICResp(header_digest=True), 11),
        (ICResp(maxh2cdata=1024), 12),
        (ICResp(maxh2cdata=4098), 12),
    ],
)
def test_icresp_bad_fields(resp: ICResp, fei: int) -> None:
    host = HostConnection()
    host.initiate()
    host.data_to_send()
    wire = bytes(resp.to_bytes())
    expect_pdu_error(host, wire, FES.INVALID_HEADER_FIELD, fei, wire)


def test_in_capsule_data_over_limit() -> None:
    ctrl = ready_controller()
    wire = capsule(1, bytes(8193))
    expect_pdu_error(ctrl, wire, FES.INVALID_HEADER_FIELD, 4, wire[:8])


def test_pdo_misaligned_for_cpda() -> None:
    ctrl = ready_controller(cpda=1)  # data must start at a multiple of 8
    wire = bytearray(capsule(1, b"abcd", pda=0))
    assert wire[3] == 72
    ok = capsule(1, b"abcd", pda=1)
    assert ok[3] == 72  # 72 is a multiple of 8 already
    wire = bytearray(h2c(1, 1, 0, b"abcd"))
    wire[3] = 28
    wire[4] = 32
    expect_pdu_error(ctrl, bytes(wire), FES.INVALID_HEADER_FIELD, 3, bytes(wire[:8]))


def test_pdo_inside_header() -> None:
    ctrl = ready_controller()
    wire = bytearray(h2c(1, 1, 0, b"abcd"))
    wire[3] = 20
    expect_pdu_error(ctrl, bytes(wire), FES.INVALID_HEADER_FIELD, 3, bytes(wire[:8]))


def controller_awaiting_h2c(
    size: int = 100, maxh2cdata: int = 4096
) -> tuple[ControllerConnection, int]:
    ctrl = ready_controller(maxh2cdata=maxh2cdata)
    ctrl.receive_data(capsule(5))
    drain(ctrl)
    ctrl.request_data(5, memoryview(bytearray(size)))
    ttag = R2T.unpack_from(joined(ctrl.data_to_send())).ttag
    return ctrl, ttag


def test_h2c_unknown_cccid() -> None:
    ctrl, ttag = controller_awaiting_h2c()
    wire = h2c(6, ttag, 0, b"x" * 10)
    expect_pdu_error(ctrl, wire, FES.INVALID_HEADER_FIELD, 8, wire[:24])


def test_h2c_without_any_r2t() -> None:
    ctrl = ready_controller()
    wire = h2c(1, 1, 0, b"x")
    expect_pdu_error(ctrl, wire, FES.INVALID_HEADER_FIELD, 8, wire[:24])


def test_h2c_wrong_ttag() -> None:
    ctrl, ttag = controller_awaiting_h2c()
    wire = h2c(5, ttag + 1, 0, b"x" * 10)
    expect_pdu_error(ctrl, wire, FES.INVALID_HEADER_FIELD, 10, wire[:24])


def test_h2c_wrong_datao() -> None:
    ctrl, ttag = controller_awaiting_h2c()
    ctrl.receive_data(h2c(5, ttag, 0, b"x" * 10, flags=0))
    wire = h2c(5, ttag, 20, b"x" * 10)
    expect_pdu_error(ctrl, wire, FES.INVALID_HEADER_FIELD, 12, wire[:24])


def test_h2c_beyond_r2t_window() -> None:
    ctrl, ttag = controller_awaiting_h2c(100)
    wire = h2c(5, ttag, 0, b"x" * 101)
    expect_pdu_error(ctrl, wire, FES.DATA_TRANSFER_OUT_OF_RANGE, 16, wire[:24])


def test_h2c_datal_inconsistent_with_plen() -> None:
    ctrl, ttag = controller_awaiting_h2c(100)
    wire = bytearray(h2c(5, ttag, 0, b"x" * 10))
    struct.pack_into("<I", wire, 16, 11)
    expect_pdu_error(ctrl, bytes(wire), FES.INVALID_HEADER_FIELD, 16, bytes(wire[:24]))


def test_h2c_over_maxh2cdata() -> None:
    ctrl, ttag = controller_awaiting_h2c(10_000, maxh2cdata=4096)
    wire = h2c(5, ttag, 0, b"x" * 4100)
    expect_pdu_error(ctrl, wire, FES.DATA_TRANSFER_LIMIT_EXCEEDED, 16, wire[:24])


def test_h2c_without_data() -> None:
    ctrl, ttag = controller_awaiting_h2c()
    wire = bytes(build_header(H2CDataHeader(5, ttag, 0, 0)))
    expect_pdu_error(ctrl, wire, FES.INVALID_HEADER_FIELD, 3, wire[:8])


def host_awaiting_c2h(size: int = 100) -> HostConnection:
    host = ready_host()
    host.send_command(make_sqe(5), read_into=[memoryview(bytearray(size))])
    host.data_to_send()
    return host


def test_c2h_unknown_cccid() -> None:
    host = host_awaiting_c2h()
    wire = c2h(6, 0, b"abc")
    expect_pdu_error(host, wire, FES.INVALID_HEADER_FIELD, 8, wire[:24])


def test_c2h_not_contiguous() -> None:
    host = host_awaiting_c2h()
    wire = c2h(5, 4, b"abc")
    expect_pdu_error(host, wire, FES.INVALID_HEADER_FIELD, 12, wire[:24])


def test_c2h_beyond_total() -> None:
    host = host_awaiting_c2h(100)
    wire = c2h(5, 0, b"a" * 101)
    expect_pdu_error(host, wire, FES.DATA_TRANSFER_OUT_OF_RANGE, 16, wire[:24])


def test_c2h_success_without_last() -> None:
    host = host_awaiting_c2h()
    wire = c2h(5, 0, b"abc", flags=PduFlags.SUCCESS)
    expect_pdu_error(host, wire, FES.INVALID_HEADER_FIELD, 1, wire[:24])


def test_r2t_unknown_command() -> None:
    host = ready_host()
    wire = bytes(build_header(R2T(9, 1, 0, 10)))
    expect_pdu_error(host, wire, FES.INVALID_HEADER_FIELD, 8, wire)


def test_r2t_beyond_write_range() -> None:
    host = ready_host()
    host.send_command(make_sqe(9), write=[b"x" * 100])
    host.data_to_send()
    wire = bytes(build_header(R2T(9, 1, 50, 51)))
    expect_pdu_error(host, wire, FES.DATA_TRANSFER_OUT_OF_RANGE, 16, wire)


def test_capsule_resp_with_data() -> None:
    host = ready_host()
    wire = bytearray(build_header(R2T(9, 1, 0, 1)))
    wire[0] = PduType.CAPSULE_RESP
    struct.pack_into("<I", wire, 4, 28)
    expect_pdu_error(host, bytes(wire) + b"abcd", FES.INVALID_HEADER_FIELD, 4, bytes(wire[:8]))


def test_term_req_bad_plen() -> None:
    ctrl = ready_controller()
    wire = bytearray(TermReq(1).to_bytes(PduType.H2C_TERM_REQ))
    struct.pack_into("<I", wire, 4, 153)
    expect_pdu_error(ctrl, bytes(wire), FES.INVALID_HEADER_FIELD, 4, bytes(wire[:8]))


# -- fuzz (h11 style): any bytes give events or PduError, nothing else -----------------------------
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans(), st.booleans())
def test_fuzz_controller(data: bytes, hd: bool, dd: bool) -> None:
    ctrl = ready_controller(header_digest=hd, data_digest=dd)
    try:
        ctrl.receive_data(data)
    except PduError:
        assert ctrl.state is ConnectionState.ERROR
        out = joined(ctrl.data_to_send())
        assert out[0] == PduType.C2H_TERM_REQ
        assert 24 <= len(out) <= 152
    drain(ctrl)


def ch_prefix() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda t, f, h, o, p, rest: struct.pack("<BBBBI", t, f, h, o, p) + rest,
        st.sampled_from([0, 2, 4, 6, 7, 8, 9]),
        st.sampled_from([0, 1, 2, 3, 4, 5, 0x10]),
        st.sampled_from([0, 24, 72, 128]),
        st.sampled_from([0, 24, 72, 76, 80, 255]),
        st.integers(0, 400),
        st.binary(max_size=400),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ch_prefix(), max_size=4), st.booleans())
def test_fuzz_controller_structured(pdus: list[bytes], bytewise: bool) -> None:
    ctrl = ready_controller()
    ctrl.receive_data(capsule(5))
    ctrl.request_data(5, memoryview(bytearray(300)))
    try:
        feed(ctrl, b"".join(pdus), "bytewise" if bytewise else "bulk")
    except PduError:
        assert ctrl.state is ConnectionState.ERROR


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_host(data: bytes) -> None:
    host = ready_host()
    host.send_command(make_sqe(0), read_into=[memoryview(bytearray(64))], write=[bytes(64)])
    try:
        host.receive_data(data)
    except PduError:
        assert host.state is ConnectionState.ERROR


def test_next_response_takes_only_a_response_and_leaves_anything_else() -> None:
    """The reader's no-await path: CapsuleResps in order; a TermReq stays for next_event."""
    host, ctrl = connect()
    for cid in (1, 2):
        host.send_command(make_sqe(cid))
    ctrl.receive_data(joined(host.data_to_send()))
    drain(ctrl)
    ctrl.send_response(make_cqe(1))
    ctrl.send_response(make_cqe(2))
    host.receive_data(joined(ctrl.data_to_send()))
    first, second = host.next_response(), host.next_response()
    assert first is not None
    assert bytes(first.cqe) == make_cqe(1)
    assert second is not None
    assert bytes(second.cqe) == make_cqe(2)
    assert host.next_response() is None  # nothing left
    ctrl.send_term_req(FES.UNSUPPORTED_PARAMETER, 0)
    host.receive_data(joined(ctrl.data_to_send()))
    assert host.next_response() is None
    assert drain(host) == [TermReqReceived(6, 0)]


def _pdu_types(wire: bytes) -> list[tuple[int, int]]:
    """(PDU type, CID or CCCID) of each PDU in ``wire``."""
    out, pos = [], 0
    while pos < len(wire):
        ch = CommonHeader.unpack_from(wire, pos)
        at = pos + (10 if ch.pdu_type == PduType.CAPSULE_CMD else 8)  # CID in the SQE, or CCCID
        out.append((ch.pdu_type, struct.unpack_from("<H", wire, at)[0]))
        pos += ch.plen
    return out


def test_a_command_overtakes_queued_bulk_data_at_a_pdu_boundary() -> None:
    """H2CData is taken ``limit`` bytes at a time, after everything else: a command queued while
    another's data waits goes out first, and each command's data stays whole and in order."""
    host, ctrl = connect(maxh2cdata=64 * KiB)
    data = pattern(256 * KiB, 3)
    host.send_command(make_sqe(1, opcode=0x01), write=[data])
    transfer(host, ctrl)
    dest = bytearray(len(data))
    ctrl.request_data(1, memoryview(dest))
    transfer(ctrl, host)  # the R2T: four H2CData PDUs of 64 KiB are queued
    host.send_command(make_sqe(2, opcode=0x02), read_into=[memoryview(bytearray(512))])
    first = joined(host.data_to_send(100 * KiB))
    # the later command first, then whole data PDUs up to the limit (at least one)
    assert _pdu_types(first) == [(PduType.CAPSULE_CMD, 2), (PduType.H2C_DATA, 1)]
    host.send_command(make_sqe(3))
    rest = joined(host.data_to_send())  # no limit: everything
    assert _pdu_types(rest) == [(PduType.CAPSULE_CMD, 3)] + [(PduType.H2C_DATA, 1)] * 3
    assert not host.has_data_to_send
    ctrl.receive_data(first + rest)
    events = drain(ctrl)
    assert DataReceived(1) in events
    assert dest == data


def test_a_termination_drops_the_bulk_data_still_queued() -> None:
    """Nothing follows our own TermReq on the wire, not even data an R2T asked for."""
    host, ctrl = connect(maxh2cdata=64 * KiB)
    host.send_command(make_sqe(1, opcode=0x01), write=[pattern(256 * KiB)])
    transfer(host, ctrl)
    ctrl.request_data(1, memoryview(bytearray(256 * KiB)))
    transfer(ctrl, host)
    assert host.has_data_to_send
    host.send_term_req(FES.UNSUPPORTED_PARAMETER)
    wire = joined(host.data_to_send(64 * KiB))
    assert _pdu_types(wire)[-1][0] == PduType.H2C_TERM_REQ
    assert PduType.H2C_DATA not in [t for t, _ in _pdu_types(wire)]
    assert not host.has_data_to_send
