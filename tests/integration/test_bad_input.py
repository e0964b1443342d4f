"""Bad input against a real target over real loopback sockets, checked against the spec.

A raw NVMe/TCP host (non-blocking sockets, anyio readiness waits) sends malformed PDUs and wrong
commands; the target must answer with the C2HTermReq (FES/FEI, REFERENCE 1.7) or the completion
status (REFERENCE 2.3, 3, 6) the spec names, and must keep serving everybody else: every test runs
next to a well-behaved ``KVClient`` that keeps storing and reading while the bad traffic flows, and
values stored before it are read back bit-exact afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import attrs
import pytest

from kvext.client import KVClient
from kvext.spec import (
    KvStatus,
    StoreOption,
    exist_command,
    retrieve_command,
    store_command,
)
from nvmeof.errors import CommandTimeout, ConnectionLost, KeyNotFound
from nvmeof.initiator.controller import Controller, default_host_identity
from nvmeof.spec.admin import async_event_request_command, keep_alive_command
from nvmeof.spec.command import AdminOpcode, Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.fabrics import (
    DYNAMIC_CNTLID,
    ConnectData,
    connect_command,
    property_get_command,
    property_set_command,
)
from nvmeof.spec.features import FeatureId, encode_number_of_queues, set_features_command
from nvmeof.spec.identify import Cns, identify_command
from nvmeof.spec.properties import CommandSetSelection, ControllerConfiguration, PropertyOffset
from nvmeof.spec.sgl import SglDescriptor, SglIdentifier
from nvmeof.spec.status import FabricsStatus, GenericStatus, StatusCodeType
from nvmeof.tcp.pdu import (
    DATA_DIGEST_TYPES,
    HEADER_DIGEST_TYPES,
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
    unpack_digest,
)
from nvmeof.testing import RunningTarget, make_kv_target, serve_target, spawn_target

pytestmark = pytest.mark.anyio

FES = FatalErrorStatus
SCT_GENERIC = StatusCodeType.GENERIC
SCT_SPECIFIC = StatusCodeType.COMMAND_SPECIFIC

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6a1c1d7e-26a4-4c8e-9a55-0c4f5d3e7b21"
HOSTID = uuid.UUID("6a1c1d7e-26a4-4c8e-9a55-0c4f5d3e7b21").bytes
KV_NSID = 1
STEP_TIMEOUT = 5.0  # one receive; generous, only there so a hang fails instead of blocking
TEST_TIMEOUT = 20.0


# --------------------------------------------------------------------------------------------------
# A raw NVMe/TCP host
# --------------------------------------------------------------------------------------------------
@attrs.frozen
class Pdu:
    ch: CommonHeader
    raw: bytes  # the whole PDU as received
    data: bytes  # PDU data (between PDO and the data digest)

    @property
    def type(self) -> int:
        return self.ch.pdu_type


@attrs.frozen
class Term:
    fes: int
    fei: int
    data: bytes  # the offending header the target echoed


class RawQueue:
    """One NVMe/TCP connection driven byte by byte; checks the digests of what it receives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.hd = False
        self.dd = False
        self.maxh2cdata = 0
        self._cids = itertools.count(0x40)

    @classmethod
    async def open(cls, address: tuple[str, int]) -> RawQueue:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(address)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)
            self.sock.close()

    # -- bytes -------------------------------------------------------------------------------
    async def send(self, *parts: bytes | bytearray) -> None:
        view = memoryview(b"".join(parts))
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
                continue
            view = view[n:]

    async def _recv_some(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" on EOF or reset."""
        while True:
            try:
                return self.sock.recv(n)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
            except ConnectionResetError:
                return b""

    async def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        with anyio.fail_after(STEP_TIMEOUT):
            while len(out) < n:
                chunk = await self._recv_some(n - len(out))
                if not chunk:
                    raise EOFError(f"connection closed after {len(out)} of {n} bytes")
                out += chunk
        return bytes(out)

    async def expect_eof(self) -> None:
        """The target closes the connection (FIN or RST) and sends nothing more."""
        with anyio.fail_after(STEP_TIMEOUT):
            extra = await self._recv_some(65536)
        assert extra == b"", f"expected the target to close, got {extra[:64].hex()}"

    # -- PDUs --------------------------------------------------------------------------------
    async def recv_pdu(self) -> Pdu:
        head = await self.recv_exact(8)
        ch = CommonHeader.unpack_from(head)
        assert ch.plen >= 8, f"PLEN {ch.plen}"
        raw = head + await self.recv_exact(ch.plen - 8)
        data = b""
        if ch.pdu_type in (PduType.IC_RESP, PduType.C2H_TERM_REQ):
            assert ch.flags == 0
            if ch.pdu_type == PduType.C2H_TERM_REQ:
                data = raw[24:]
            return Pdu(ch, raw, data)
        assert ch.hlen == 24, f"C2H PDU type {ch.pdu_type} with HLEN {ch.hlen}"
        if ch.pdu_type in HEADER_DIGEST_TYPES:
            assert bool(ch.flags & PduFlags.HDGSTF) == self.hd
            if self.hd:
                assert unpack_digest(raw, 24) == crc32c_of([raw[:24]]), "bad header digest"
        if ch.pdo:
            ddgst = 4 if ch.flags & PduFlags.DDGSTF else 0
            if ch.pdu_type in DATA_DIGEST_TYPES:
                assert bool(ddgst) == self.dd
            data = raw[ch.pdo : ch.plen - ddgst]
            if ddgst:
                assert unpack_digest(raw, ch.plen - 4) == crc32c_of([data]), "bad data digest"
        return Pdu(ch, raw, data)

    async def expect_term(self) -> Term:
        """The next PDU is a C2HTermReq (REFERENCE 1.7), and the target then closes."""
        pdu = await self.recv_pdu()
        assert pdu.type == PduType.C2H_TERM_REQ, f"expected C2HTermReq, got type {pdu.type:#x}"
        assert pdu.ch.hlen == 24
        assert pdu.ch.pdo == 0
        assert 24 <= pdu.ch.plen <= 152
        term = TermReq.unpack_from(pdu.raw)
        await self.expect_eof()
        return Term(term.fes, term.fei, pdu.data)

    async def handshake(self, *, hd: bool = False, dd: bool = False) -> ICResp:
        await self.send(ICReq(header_digest=hd, data_digest=dd).to_bytes())
        pdu = await self.recv_pdu()
        assert pdu.type == PduType.IC_RESP
        assert pdu.ch.hlen == 128
        assert pdu.ch.plen == 128
        assert pdu.ch.pdo == 0
        resp = ICResp.unpack_from(pdu.raw)
        assert resp.pfv == 0
        assert resp.cpda == 0
        assert resp.maxh2cdata >= 4096
        assert resp.maxh2cdata % 4 == 0
        self.hd, self.dd = resp.header_digest, resp.data_digest
        self.maxh2cdata = resp.maxh2cdata
        return resp

    def capsule(
        self,
        cmd: Command,
        data: bytes = b"",
        *,
        bad_hdgst: bool = False,
        bad_ddgst: bool = False,
    ) -> bytes:
        """A CapsuleCmd PDU for ``cmd`` with ``data`` in the capsule (digests as negotiated)."""
        sqe = bytearray(64)
        cmd.pack_into(sqe)
        header = build_header(
            CapsuleCmdHeader(bytes(sqe)),
            header_digest=self.hd,
            data_length=len(data),
            data_digest=self.dd,
        )
        if bad_hdgst:
            assert self.hd
            header[72] ^= 0xFF
        out = bytes(header) + data
        if data and self.dd:
            digest = crc32c_of([data]) ^ (0xDEADBEEF if bad_ddgst else 0)
            out += pack_digest(digest)
        return out

    def h2c_data(
        self, cccid: int, ttag: int, datao: int, data: bytes, *, last: bool = True
    ) -> tuple[bytes, bytes]:
        """(header, whole PDU) of an H2CData PDU."""
        header = build_header(
            H2CDataHeader(cccid, ttag, datao, len(data)),
            flags=PduFlags.LAST_PDU if last else 0,
            header_digest=self.hd,
            data_length=len(data),
            data_digest=self.dd,
        )
        tail = pack_digest(crc32c_of([data])) if self.dd else b""
        return bytes(header), bytes(header) + data + tail

    # -- commands ----------------------------------------------------------------------------
    def prepare(self, cmd: Command, data: bytes = b"") -> Command:
        cmd = cmd.with_cid(next(self._cids) & 0xFFFF)
        if data:
            cmd = cmd.with_dptr(
                SglDescriptor(length=len(data), identifier=SglIdentifier.DATA_BLOCK_OFFSET)
            )
        return cmd

    async def submit(self, cmd: Command, data: bytes = b"", **kw: bool) -> Command:
        cmd = self.prepare(cmd, data)
        await self.send(self.capsule(cmd, data, **kw))
        return cmd

    async def response(self, cid: int) -> tuple[Completion, bytes]:
        """The completion of ``cid`` (C2HData before it collected); an R2T fails the test."""
        data = bytearray()
        while True:
            pdu = await self.recv_pdu()
            if pdu.type == PduType.C2H_DATA:
                cccid, _, datao, datal = struct.unpack_from("<HHII", pdu.raw, 8)
                assert cccid == cid
                assert datao == len(data)
                assert datal == len(pdu.data)
                data += pdu.data
                continue
            assert pdu.type == PduType.CAPSULE_RESP, f"expected CapsuleResp, got {pdu.type:#x}"
            completion = Completion.unpack_from(pdu.raw, 8)
            assert completion.cid == cid
            return completion, bytes(data)

    async def execute(self, cmd: Command, data: bytes = b"", **kw: bool) -> Completion:
        sent = await self.submit(cmd, data, **kw)
        completion, _ = await self.response(sent.cid)
        return completion

    async def connect(
        self,
        subnqn: str,
        *,
        qid: int = 0,
        cntlid: int = DYNAMIC_CNTLID,
        hostnqn: str = HOSTNQN,
        hostid: bytes = HOSTID,
        sqsize: int = 31,
        kato_ms: int = 0,
        **kw: bool,
    ) -> Completion:
        data = ConnectData(hostid=hostid, cntlid=cntlid, subnqn=subnqn, hostnqn=hostnqn).pack()
        cmd = connect_command(qid=qid, sqsize=sqsize, kato_ms=kato_ms)
        return await self.execute(cmd, data, **kw)


async def eventually(predicate: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> None:
    """Wait until ``predicate()`` holds; ``timeout`` is only a generous bound against hangs."""
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.01)


def assert_status(completion: Completion, sct: int, sc: int) -> None:
    status = completion.status
    assert (status.sct, status.sc) == (sct, sc), f"got {status}, expected sct={sct} sc={sc:#x}"


def assert_ok(completion: Completion) -> None:
    assert_status(completion, 0, 0)


ENABLE_CC = ControllerConfiguration(
    en=True, css=CommandSetSelection.ALL_IO, iosqes=6, iocqes=4
).to_int()


@contextlib.asynccontextmanager
async def raw_queue(address: tuple[str, int]) -> AsyncIterator[RawQueue]:
    queue = await RawQueue.open(address)
    try:
        yield queue
    finally:
        queue.close()


@contextlib.asynccontextmanager
async def raw_controller(
    rt: RunningTarget, *, hd: bool = False, dd: bool = False, granted: int = 1
) -> AsyncIterator[tuple[RawQueue, RawQueue, int]]:
    """(admin queue, I/O queue 1, cntlid): connected, enabled, ``granted`` I/O queues."""
    async with raw_queue(rt.address) as admin, raw_queue(rt.address) as io:
        await admin.handshake(hd=hd, dd=dd)
        completion = await admin.connect(rt.nqn)
        assert_ok(completion)
        cntlid = completion.dw0 & 0xFFFF
        assert_ok(await admin.execute(property_set_command(PropertyOffset.CC, ENABLE_CC)))
        csts = await admin.execute(property_get_command(PropertyOffset.CSTS))
        assert csts.dw0 & 1, "CSTS.RDY after enable"
        queues = encode_number_of_queues(granted - 1, granted - 1)
        answer = await admin.execute(set_features_command(FeatureId.NUMBER_OF_QUEUES, queues))
        assert_ok(answer)
        assert answer.dw0 == queues
        await io.handshake(hd=hd, dd=dd)
        assert_ok(await io.connect(rt.nqn, qid=1, cntlid=cntlid))
        yield admin, io, cntlid


# --------------------------------------------------------------------------------------------------
# The well-behaved neighbour
# --------------------------------------------------------------------------------------------------
@attrs.define
class Harness:
    rt: RunningTarget
    client: KVClient
    stored: dict[bytes, bytes]
    stop: anyio.Event = attrs.Factory(anyio.Event)
    rounds: int = 0

    async def neighbour(self) -> None:
        """Store, read back and check values until told to stop (at least three rounds)."""
        for i in itertools.count():
            if self.stop.is_set() and i >= 3:
                return
            key = b"good-%d" % (i % 8)
            value = os.urandom(100 + 997 * i % 30000)
            await self.client.put(key, value)
            assert await self.client.get(key) == value
            assert await self.client.exists(key)
            self.rounds += 1


@contextlib.asynccontextmanager
async def harness(target: object = None, **serve: bool) -> AsyncIterator[Harness]:
    """A target, a well-behaved client working all along, and values checked afterwards."""
    with anyio.fail_after(TEST_TIMEOUT):
        async with serve_target(target, **serve) as rt:  # type: ignore[arg-type]
            async with KVClient.connect(rt.address, rt.nqn, io_queues=2, timeout=10.0) as client:
                stored = {
                    b"pre-small": os.urandom(37),
                    b"pre-r2t": os.urandom(20_000),  # beyond the 8 KiB in-capsule limit
                    b"pre-large": os.urandom(60_000),
                }
                for key, value in stored.items():
                    await client.put(key, value)
                h = Harness(rt, client, stored)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(h.neighbour)
                    try:
                        yield h
                    except BaseException:
                        tg.cancel_scope.cancel()
                        raise
                    h.stop.set()
                assert h.rounds >= 3
                for key, value in stored.items():
                    assert await client.get(key) == value, f"{key!r} changed"
            # a fresh connection after the bad traffic works too
            async with KVClient.connect(rt.address, rt.nqn, timeout=10.0) as fresh:
                for key, value in stored.items():
                    assert await fresh.get(key) == value
                await fresh.put(b"after", b"still serving")
                assert await fresh.get(b"after") == b"still serving"


# --------------------------------------------------------------------------------------------------
# Transport-level scenarios: each checks the C2HTermReq and the close
# --------------------------------------------------------------------------------------------------
def ch_bytes(pdu_type: int, flags: int, hlen: int, pdo: int, plen: int) -> bytes:
    out = bytearray(8)
    CommonHeader(pdu_type, flags, hlen, pdo, plen).pack_into(out)
    return bytes(out)


def some_sqe(cid: int = 7) -> bytes:
    return keep_alive_command(cid=cid).to_bytes()


async def capsule_before_icreq(rt: RunningTarget) -> None:
    async with raw_queue(rt.address) as q:
        pdu = ch_bytes(PduType.CAPSULE_CMD, 0, 72, 0, 72) + some_sqe()
        await q.send(pdu)
        term = await q.expect_term()
        assert term.fes == FES.PDU_SEQUENCE_ERROR
        assert term.data
        assert pdu.startswith(term.data)


async def h2c_data_before_icreq(rt: RunningTarget) -> None:
    async with raw_queue(rt.address) as q:
        pdu = ch_bytes(PduType.H2C_DATA, PduFlags.LAST_PDU, 24, 24, 28) + bytes(16) + b"abcd"
        await q.send(pdu)
        term = await q.expect_term()
        assert term.fes == FES.PDU_SEQUENCE_ERROR
        assert pdu.startswith(term.data)


async def second_icreq(rt: RunningTarget) -> None:
    async with raw_queue(rt.address) as q:
        await q.handshake()
        again = bytes(ICReq().to_bytes())
        await q.send(again)
        term = await q.expect_term()
        assert term.fes == FES.PDU_SEQUENCE_ERROR
        assert again.startswith(term.data)


async def second_icreq_after_connect(rt: RunningTarget) -> None:
    async with raw_queue(rt.address) as q:
        await q.handshake()
        assert_ok(await q.connect(rt.nqn))
        await q.send(ICReq().to_bytes())
        term = await q.expect_term()
        assert term.fes == FES.PDU_SEQUENCE_ERROR


def _bad_header_case(
    name: str, pdu: bytes, fes: int, fei: int | None, *, handshake: bool = True
) -> Callable[[RunningTarget], Awaitable[None]]:
    async def scenario(rt: RunningTarget) -> None:
        async with raw_queue(rt.address) as q:
            if handshake:
                await q.handshake()
            await q.send(pdu)
            term = await q.expect_term()
            assert (term.fes, term.fei if fei is not None else None) == (fes, fei), term
            assert len(term.data) >= 8
            assert pdu.startswith(term.data)

    scenario.__name__ = name
    return scenario


_SQE = some_sqe()
_ICREQ = bytes(ICReq().to_bytes())
HEADER_CASES = [
    # HLEN wrong for the type: FEI 2
    _bad_header_case(
        "capsule_hlen_24", ch_bytes(PduType.CAPSULE_CMD, 0, 24, 0, 72) + _SQE, FES(1), 2
    ),
    _bad_header_case(
        "capsule_hlen_80", ch_bytes(PduType.CAPSULE_CMD, 0, 80, 0, 80) + _SQE + bytes(8), FES(1), 2
    ),
    _bad_header_case(
        "h2c_data_hlen_72",
        ch_bytes(PduType.H2C_DATA, 0, 72, 72, 76) + bytes(64) + b"data",
        FES(1),
        2,
    ),
    _bad_header_case(
        "icreq_hlen_24",
        ch_bytes(PduType.IC_REQ, 0, 24, 0, 128) + _ICREQ[8:],
        FES(1),
        2,
        handshake=False,
    ),
    # PLEN wrong: FEI 4
    _bad_header_case(
        "capsule_plen_64", ch_bytes(PduType.CAPSULE_CMD, 0, 72, 0, 64) + _SQE, FES(1), 4
    ),
    _bad_header_case(
        "capsule_plen_0", ch_bytes(PduType.CAPSULE_CMD, 0, 72, 0, 0) + _SQE, FES(1), 4
    ),
    _bad_header_case(
        "icreq_plen_132",
        ch_bytes(PduType.IC_REQ, 0, 128, 0, 132) + _ICREQ[8:] + bytes(4),
        FES(1),
        4,
        handshake=False,
    ),
    _bad_header_case(
        "capsule_in_capsule_data_beyond_admin_limit",
        ch_bytes(PduType.CAPSULE_CMD, 0, 72, 72, 72 + 8196) + _SQE + bytes(8196),
        FES(1),
        4,
    ),
    # unknown or controller-to-host PDU types: FEI 0
    _bad_header_case("type_0x08", ch_bytes(0x08, 0, 24, 0, 24) + bytes(16), FES(1), 0),
    _bad_header_case("type_0x0a", ch_bytes(0x0A, 0, 24, 0, 24) + bytes(16), FES(1), 0),
    _bad_header_case("type_0xff", ch_bytes(0xFF, 0, 24, 0, 24) + bytes(16), FES(1), 0),
    _bad_header_case(
        "type_0x0a_before_icreq",
        ch_bytes(0x0A, 0, 24, 0, 24) + bytes(16),
        FES(1),
        0,
        handshake=False,
    ),
    _bad_header_case(
        "c2h_type_capsule_resp", ch_bytes(PduType.CAPSULE_RESP, 0, 24, 0, 24) + bytes(16), FES(1), 0
    ),
    _bad_header_case(
        "c2h_type_icresp",
        bytes(ICResp().to_bytes()),
        FES(1),
        0,
        handshake=False,
    ),
    # FLAGS not allowed for the type / contrary to negotiation: FEI 1
    _bad_header_case(
        "capsule_flag_last_pdu",
        ch_bytes(PduType.CAPSULE_CMD, PduFlags.LAST_PDU, 72, 0, 72) + _SQE,
        FES(1),
        1,
    ),
    _bad_header_case(
        "capsule_hdgstf_not_negotiated",
        ch_bytes(PduType.CAPSULE_CMD, PduFlags.HDGSTF, 72, 0, 76) + _SQE + bytes(4),
        FES(1),
        1,
    ),
    # PDO of a capsule with data below the header or misaligned: FEI 3
    _bad_header_case(
        "capsule_pdo_below_hlen",
        ch_bytes(PduType.CAPSULE_CMD, 0, 72, 68, 80) + _SQE + bytes(8),
        FES(1),
        3,
    ),
    _bad_header_case(
        "capsule_pdo_unaligned",
        ch_bytes(PduType.CAPSULE_CMD, 0, 72, 74, 82) + _SQE + bytes(10),
        FES(1),
        3,
    ),
    _bad_header_case(
        "capsule_ddgstf_without_data",
        ch_bytes(PduType.CAPSULE_CMD, PduFlags.DDGSTF, 72, 0, 72) + _SQE,
        FES(1),
        1,
    ),
    # a host termination request with an impossible PLEN
    _bad_header_case(
        "h2c_term_req_plen_200",
        ch_bytes(PduType.H2C_TERM_REQ, 0, 24, 0, 200) + bytes(16),
        FES(1),
        4,
    ),
    _bad_header_case(
        "h2c_term_req_plen_20",
        ch_bytes(PduType.H2C_TERM_REQ, 0, 24, 0, 20) + bytes(16),
        FES(1),
        4,
    ),
    # ICReq fields
    _bad_header_case(
        "icreq_pfv_1",
        _ICREQ[:8] + struct.pack("<H", 1) + _ICREQ[10:],
        FES(1),
        8,
        handshake=False,
    ),
    _bad_header_case(
        "icreq_hpda_32", _ICREQ[:10] + bytes([32]) + _ICREQ[11:], FES(1), 10, handshake=False
    ),
]


async def bad_header_digest(rt: RunningTarget) -> None:
    async with raw_queue(rt.address) as q:
        resp = await q.handshake(hd=True)
        assert resp.header_digest
        pdu = q.capsule(q.prepare(keep_alive_command()), bad_hdgst=True)
        await q.send(pdu)
        term = await q.expect_term()
        assert term.fes == FES.HEADER_DIGEST_ERROR
        assert pdu.startswith(term.data)
        assert len(term.data) >= 72


async def bad_header_digest_after_connect(rt: RunningTarget) -> None:
    async with raw_queue(rt.address) as q:
        await q.handshake(hd=True, dd=True)
        assert_ok(await q.connect(rt.nqn))
        await q.send(q.capsule(q.prepare(property_get_command(PropertyOffset.VS)), bad_hdgst=True))
        term = await q.expect_term()
        assert term.fes == FES.HEADER_DIGEST_ERROR


async def store_with_r2t(q: RawQueue, key: bytes, size: int) -> tuple[Command, int, int]:
    """Send a Store whose data moves by R2T; return (command, TTAG, R2TL) of the R2T."""
    cmd = await q.submit(store_command(KV_NSID, key, size))
    pdu = await q.recv_pdu()
    assert pdu.type == PduType.R2T, f"expected R2T, got {pdu.type:#x}"
    cccid, ttag, r2to, r2tl = struct.unpack_from("<HHII", pdu.raw, 8)
    assert (cccid, r2to, r2tl) == (cmd.cid, 0, size)
    assert ttag != 0
    return cmd, ttag, r2tl


async def h2c_beyond_r2t_window(rt: RunningTarget) -> None:
    async with raw_controller(rt) as (_, io, _cntlid):
        cmd, ttag, r2tl = await store_with_r2t(io, b"window", 4096)
        header, pdu = io.h2c_data(cmd.cid, ttag, 0, os.urandom(r2tl + 4))
        await io.send(pdu)
        term = await io.expect_term()
        assert term.fes in (FES.DATA_TRANSFER_OUT_OF_RANGE, FES.INVALID_HEADER_FIELD), term
        if term.fes == FES.DATA_TRANSFER_OUT_OF_RANGE:
            assert term.fei in (0, 12, 16)
        assert term.data == header[:24], "TermReq data must echo the offending H2CData header"


async def h2c_beyond_r2t_window_split(rt: RunningTarget) -> None:
    # The first PDU is fine, the second runs past R2TL.
    async with raw_controller(rt) as (_, io, _cntlid):
        cmd, ttag, _r2tl = await store_with_r2t(io, b"window2", 8192)
        _, first = io.h2c_data(cmd.cid, ttag, 0, os.urandom(4096), last=False)
        header, second = io.h2c_data(cmd.cid, ttag, 4096, os.urandom(8192))
        await io.send(first, second)
        term = await io.expect_term()
        assert term.fes in (FES.DATA_TRANSFER_OUT_OF_RANGE, FES.INVALID_HEADER_FIELD), term
        assert term.data == header[:24]


async def h2c_unknown_cccid(rt: RunningTarget) -> None:
    async with raw_controller(rt) as (_, io, _cntlid):
        header, pdu = io.h2c_data(0x1234, 1, 0, b"x" * 64)
        await io.send(pdu)
        term = await io.expect_term()
        assert (term.fes, term.fei) == (FES.INVALID_HEADER_FIELD, 8)
        assert term.data == header[:24]


async def h2c_unknown_cccid_with_r2t_outstanding(rt: RunningTarget) -> None:
    async with raw_controller(rt) as (_, io, _cntlid):
        cmd, ttag, _ = await store_with_r2t(io, b"cccid", 4096)
        header, pdu = io.h2c_data(cmd.cid ^ 0x8000, ttag, 0, b"y" * 4096)
        await io.send(pdu)
        term = await io.expect_term()
        assert (term.fes, term.fei) == (FES.INVALID_HEADER_FIELD, 8)
        assert term.data == header[:24]


async def h2c_wrong_ttag(rt: RunningTarget) -> None:
    async with raw_controller(rt) as (_, io, _cntlid):
        cmd, ttag, _ = await store_with_r2t(io, b"ttag", 4096)
        header, pdu = io.h2c_data(cmd.cid, ttag ^ 0x5A5A, 0, b"z" * 4096)
        await io.send(pdu)
        term = await io.expect_term()
        assert (term.fes, term.fei) == (FES.INVALID_HEADER_FIELD, 10)
        assert term.data == header[:24]


async def h2c_wrong_datao(rt: RunningTarget) -> None:
    async with raw_controller(rt) as (_, io, _cntlid):
        cmd, ttag, _ = await store_with_r2t(io, b"datao", 8192)
        header, pdu = io.h2c_data(cmd.cid, ttag, 4096, b"w" * 4096)
        await io.send(pdu)
        term = await io.expect_term()
        assert (term.fes, term.fei) == (FES.INVALID_HEADER_FIELD, 12)
        assert term.data == header[:24]


async def h2c_beyond_maxh2cdata(rt: RunningTarget) -> None:
    async with raw_controller(rt) as (_, io, _cntlid):
        cmd, ttag, _ = await store_with_r2t(io, b"maxh2c", 4096)
        datal = io.maxh2cdata + 4
        header = build_header(
            H2CDataHeader(cmd.cid, ttag, 0, datal),
            flags=PduFlags.LAST_PDU,
            data_length=datal,
        )
        await io.send(header, b"q" * 1000)  # the header alone condemns it
        term = await io.expect_term()
        assert term.fes == FES.DATA_TRANSFER_LIMIT_EXCEEDED, term
        assert term.data == bytes(header[:24])


async def io_queue_in_capsule_data_beyond_ioccsz(rt: RunningTarget) -> None:
    async with raw_controller(rt) as (_, io, _cntlid):
        value = os.urandom(8192 + 4)  # IOCCSZ * 16 - 64 = 8192
        pdu = io.capsule(io.prepare(store_command(KV_NSID, b"icd", len(value)), value), value)
        await io.send(pdu)
        term = await io.expect_term()
        assert (term.fes, term.fei) == (FES.INVALID_HEADER_FIELD, 4)
        assert pdu.startswith(term.data)


async def host_term_req_closes_quietly(rt: RunningTarget) -> None:
    async with raw_queue(rt.address) as q:
        await q.handshake()
        assert_ok(await q.connect(rt.nqn))
        offending = q.capsule(q.prepare(keep_alive_command()))
        await q.send(TermReq(FES.INVALID_HEADER_FIELD, 2).to_bytes(PduType.H2C_TERM_REQ, offending))
        await q.expect_eof()  # no C2HTermReq in answer to a termination


TRANSPORT_SCENARIOS: list[Callable[[RunningTarget], Awaitable[None]]] = [
    capsule_before_icreq,
    h2c_data_before_icreq,
    second_icreq,
    second_icreq_after_connect,
    *HEADER_CASES,
    bad_header_digest,
    bad_header_digest_after_connect,
    h2c_beyond_r2t_window,
    h2c_beyond_r2t_window_split,
    h2c_unknown_cccid,
    h2c_unknown_cccid_with_r2t_outstanding,
    h2c_wrong_ttag,
    h2c_wrong_datao,
    h2c_beyond_maxh2cdata,
    io_queue_in_capsule_data_beyond_ioccsz,
    host_term_req_closes_quietly,
]


@pytest.mark.parametrize("scenario", TRANSPORT_SCENARIOS, ids=lambda f: f.__name__)
async def test_fatal_transport_error(scenario: Callable[[RunningTarget], Awaitable[None]]) -> None:
    async with harness() as h:
        await scenario(h.rt)


# --------------------------------------------------------------------------------------------------
# Data digest errors: the command fails, the connection lives
# --------------------------------------------------------------------------------------------------
async def test_bad_data_digest_fails_only_the_command() -> None:
    async with harness() as h, raw_queue(h.rt.address) as admin, raw_queue(h.rt.address) as io:
        rt = h.rt
        await admin.handshake(hd=True, dd=True)
        assert admin.hd
        assert admin.dd
        # the Connect's in-capsule data fails its digest: that command fails, transiently
        bad = await admin.connect(rt.nqn, bad_ddgst=True)
        assert_status(bad, SCT_GENERIC, GenericStatus.TRANSIENT_TRANSPORT_ERROR)
        assert not bad.status.dnr, "a transient transport error may be retried"
        # ...and the same connection still works
        good = await admin.connect(rt.nqn)
        assert_ok(good)
        cntlid = good.dw0 & 0xFFFF
        assert_ok(await admin.execute(property_set_command(PropertyOffset.CC, ENABLE_CC)))
        queues = encode_number_of_queues(0, 0)
        assert_ok(await admin.execute(set_features_command(FeatureId.NUMBER_OF_QUEUES, queues)))
        await io.handshake(hd=True, dd=True)
        assert_ok(await io.connect(rt.nqn, qid=1, cntlid=cntlid))

        value = os.urandom(3000)
        cmd = store_command(KV_NSID, b"digest", len(value))
        bad = await io.execute(cmd, value, bad_ddgst=True)
        assert_status(bad, SCT_GENERIC, GenericStatus.TRANSIENT_TRANSPORT_ERROR)
        # nothing was stored from the corrupted capsule
        missing = await io.execute(exist_command(KV_NSID, b"digest"))
        assert_status(missing, SCT_GENERIC, KvStatus.KEY_DOES_NOT_EXIST)
        assert_ok(await io.execute(cmd, value))
        sent = await io.submit(retrieve_command(KV_NSID, b"digest", 4096))
        completion, data = await io.response(sent.cid)  # C2H digests checked by recv_pdu
        assert_ok(completion)
        assert completion.dw0 == len(value)
        assert data == value


async def test_bad_data_digest_on_h2c_data_fails_only_the_command() -> None:
    async with harness() as h, raw_controller(h.rt, hd=True, dd=True) as (_, io, _cntlid):
        value = os.urandom(10_000)
        cmd, ttag, _ = await store_with_r2t(io, b"h2cdigest", len(value))
        _header, pdu = io.h2c_data(cmd.cid, ttag, 0, value)
        corrupted = pdu[:-4] + bytes(b ^ 0xFF for b in pdu[-4:])
        await io.send(corrupted)
        completion, _ = await io.response(cmd.cid)
        assert_status(completion, SCT_GENERIC, GenericStatus.TRANSIENT_TRANSPORT_ERROR)
        missing = await io.execute(exist_command(KV_NSID, b"h2cdigest"))
        assert_status(missing, SCT_GENERIC, KvStatus.KEY_DOES_NOT_EXIST)
        # the connection still moves data
        cmd, ttag, _r2tl = await store_with_r2t(io, b"h2cdigest", len(value))
        _, pdu = io.h2c_data(cmd.cid, ttag, 0, value)
        await io.send(pdu)
        completion, _ = await io.response(cmd.cid)
        assert_ok(completion)
        sent = await io.submit(retrieve_command(KV_NSID, b"h2cdigest", len(value)))
        completion, data = await io.response(sent.cid)
        assert_ok(completion)
        assert data == value


async def test_digests_refused_when_not_allowed() -> None:
    async with harness(allow_digests=False) as h, raw_queue(h.rt.address) as q:
        resp = await q.handshake(hd=True, dd=True)
        assert not resp.header_digest
        assert not resp.data_digest
        assert_ok(await q.connect(h.rt.nqn))


# --------------------------------------------------------------------------------------------------
# Truncated PDUs and abrupt closes
# --------------------------------------------------------------------------------------------------
TRUNCATIONS = {
    "partial_common_header": b"\x04\x00\x48",
    "partial_icreq": bytes(ICReq().to_bytes())[:60],
    "partial_capsule": None,  # after ICReq, half a CapsuleCmd
    "capsule_missing_data": None,  # after ICReq, a CapsuleCmd announcing more data than sent
    "h2c_data_missing_payload": None,  # after an R2T, half the data
}


@pytest.mark.parametrize("case", list(TRUNCATIONS))
async def test_truncated_pdu_then_close(case: str) -> None:
    async with harness() as h:
        rt = h.rt
        if case in ("partial_common_header", "partial_icreq"):
            async with raw_queue(rt.address) as q:
                await q.send(TRUNCATIONS[case] or b"")
        elif case == "partial_capsule":
            async with raw_queue(rt.address) as q:
                await q.handshake()
                await q.send(q.capsule(q.prepare(keep_alive_command()))[:40])
        elif case == "capsule_missing_data":
            async with raw_queue(rt.address) as q:
                await q.handshake()
                data = ConnectData(HOSTID, DYNAMIC_CNTLID, rt.nqn, HOSTNQN).pack()
                pdu = q.capsule(q.prepare(connect_command(qid=0, sqsize=31), data), data)
                await q.send(pdu[:500])
        else:
            async with raw_controller(rt) as (_, io, cntlid):
                cmd, ttag, r2tl = await store_with_r2t(io, b"truncated", 8192)
                _, pdu = io.h2c_data(cmd.cid, ttag, 0, os.urandom(r2tl))
                await io.send(pdu[:3000])
            # the Store was never completed: the key does not exist; the controller is gone
            assert not await h.client.exists(b"truncated")
            assert rt.target is not None
            controllers = rt.target.subsystems[rt.nqn].controllers
            await eventually(lambda: cntlid not in controllers)
        # the target shrugged the truncated connection off: the neighbour still works
        await h.client.put(b"truncation-probe", b"ok")
        assert await h.client.get(b"truncation-probe") == b"ok"


async def test_abrupt_close_with_command_in_flight() -> None:
    """A host that sends a command and leaves without reading the answer harms no one."""
    async with harness() as h:
        for _ in range(5):
            async with raw_controller(h.rt) as (admin, io, _):
                await io.submit(retrieve_command(KV_NSID, b"pre-large", 65536))
                await admin.submit(async_event_request_command())
                await admin.submit(identify_command(Cns.CONTROLLER))
        assert await h.client.get(b"pre-large") == h.stored[b"pre-large"]


# --------------------------------------------------------------------------------------------------
# Command-level errors: completions, not terminations
# --------------------------------------------------------------------------------------------------
async def test_commands_before_connect() -> None:
    async with harness() as h, raw_queue(h.rt.address) as q:
        await q.handshake()
        for cmd in (
            exist_command(KV_NSID, b"pre-small"),
            retrieve_command(KV_NSID, b"pre-small", 4096),
            identify_command(Cns.CONTROLLER),
            keep_alive_command(),
            property_get_command(PropertyOffset.CAP, size=8),
        ):
            completion = await q.execute(cmd)
            assert_status(completion, SCT_GENERIC, GenericStatus.COMMAND_SEQUENCE_ERROR)
        # the queue can still be connected afterwards
        assert_ok(await q.connect(h.rt.nqn))


async def test_commands_before_enable() -> None:
    async with harness() as h, raw_queue(h.rt.address) as admin, raw_queue(h.rt.address) as io:
        await admin.handshake()
        completion = await admin.connect(h.rt.nqn)
        assert_ok(completion)
        cntlid = completion.dw0 & 0xFFFF
        identify = await admin.execute(identify_command(Cns.CONTROLLER))
        assert_status(identify, SCT_GENERIC, GenericStatus.COMMAND_SEQUENCE_ERROR)
        # properties work on a disabled controller
        assert_ok(await admin.execute(property_get_command(PropertyOffset.CAP, size=8)))
        await io.handshake()
        refused = await io.connect(h.rt.nqn, qid=1, cntlid=cntlid)
        assert not refused.status.success


async def test_second_connect_on_a_connected_queue() -> None:
    async with harness() as h, raw_controller(h.rt) as (admin, io, cntlid):
        again = await admin.connect(h.rt.nqn)
        assert not again.status.success
        assert again.status.dnr
        again = await io.connect(h.rt.nqn, qid=1, cntlid=cntlid)
        assert not again.status.success
        # both queues still serve their controller
        assert_ok(await admin.execute(keep_alive_command()))
        assert_ok(await io.execute(exist_command(KV_NSID, b"pre-small")))


@pytest.mark.parametrize("nsid", [0, 2, 7, 0xFFFFFFFF])
async def test_io_to_absent_namespace(nsid: int) -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        for cmd in (
            exist_command(nsid, b"pre-small"),
            retrieve_command(nsid, b"pre-small", 4096),
        ):
            completion = await io.execute(cmd)
            assert_status(completion, SCT_GENERIC, GenericStatus.INVALID_NAMESPACE_OR_FORMAT)
        store = store_command(nsid, b"k", 16)
        completion = await io.execute(store, b"0123456789abcdef")
        assert_status(completion, SCT_GENERIC, GenericStatus.INVALID_NAMESPACE_OR_FORMAT)


@pytest.mark.parametrize("opcode", [0x01, 0x04, 0x05, 0x80, 0xC1])
async def test_unknown_admin_opcode(opcode: int) -> None:
    async with harness() as h, raw_controller(h.rt) as (admin, _, _cntlid):
        completion = await admin.execute(Command(opcode=opcode))
        assert_status(completion, SCT_GENERIC, GenericStatus.INVALID_OPCODE)
        assert_ok(await admin.execute(keep_alive_command()))


@pytest.mark.parametrize("opcode", [0x04, 0x08, 0x81, 0x90, 0xFE])  # 0x00 is Flush
async def test_unknown_io_opcode(opcode: int) -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        completion = await io.execute(Command(opcode=opcode, nsid=KV_NSID))
        assert_status(completion, SCT_GENERIC, GenericStatus.INVALID_OPCODE)
        assert_ok(await io.execute(exist_command(KV_NSID, b"pre-small")))


async def test_unknown_fabrics_command_type() -> None:
    async with harness() as h, raw_controller(h.rt) as (admin, _, _cntlid):
        completion = await admin.execute(Command(opcode=AdminOpcode.FABRICS, nsid=0x7E, flags=0))
        assert_status(completion, SCT_GENERIC, GenericStatus.INVALID_OPCODE)


async def test_store_larger_than_max_value_requests_no_data() -> None:
    max_value = 65536
    async with (
        harness(make_kv_target(max_value_length=max_value)) as h,
        raw_controller(h.rt) as (_, io, _cntlid),
    ):
        cmd = await io.submit(store_command(KV_NSID, b"huge", max_value + 1))
        pdu = await io.recv_pdu()
        assert pdu.type == PduType.CAPSULE_RESP, "a refused Store must not ask for its data (R2T)"
        completion = Completion.unpack_from(pdu.raw, 8)
        assert completion.cid == cmd.cid
        assert_status(completion, SCT_GENERIC, KvStatus.INVALID_VALUE_SIZE)
        assert completion.status.dnr
        # the connection goes on, and a Store of exactly the limit is accepted
        completion = await io.execute(exist_command(KV_NSID, b"huge"))
        assert_status(completion, SCT_GENERIC, KvStatus.KEY_DOES_NOT_EXIST)
        cmd, ttag, _r2tl = await store_with_r2t(io, b"huge", max_value)
        value = os.urandom(max_value)
        _, pdu_bytes = io.h2c_data(cmd.cid, ttag, 0, value)
        await io.send(pdu_bytes)
        completion, _ = await io.response(cmd.cid)
        assert_ok(completion)


async def test_store_larger_than_max_value_in_capsule() -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        small = make_kv_target(max_value_length=16)
        async with serve_target(small) as rt2, raw_controller(rt2) as (_, io2, _c2):
            value = b"v" * 17
            completion = await io2.execute(store_command(KV_NSID, b"k17", 17), value)
            assert_status(completion, SCT_GENERIC, KvStatus.INVALID_VALUE_SIZE)
            completion = await io2.execute(store_command(KV_NSID, b"k16", 16), value[:16])
            assert_ok(completion)
        assert_ok(await io.execute(exist_command(KV_NSID, b"pre-small")))


def _with_key_length(cmd: Command, key_length: int) -> Command:
    return attrs.evolve(cmd, cdw11=(cmd.cdw11 & ~0xFF) | key_length)


@pytest.mark.parametrize(
    ("key_length", "sc"),
    [(0, KvStatus.INVALID_KEY_SIZE), (17, GenericStatus.INVALID_FIELD), (255, 0x02)],
)
async def test_bad_key_length(key_length: int, sc: int) -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        key = b"0123456789abcdef"
        store = _with_key_length(store_command(KV_NSID, key, 8), key_length)
        completion = await io.execute(store, b"12345678")
        assert_status(completion, SCT_GENERIC, sc)
        retrieve = _with_key_length(retrieve_command(KV_NSID, key, 4096), key_length)
        assert_status(await io.execute(retrieve), SCT_GENERIC, sc)
        exist = _with_key_length(exist_command(KV_NSID, key), key_length)
        assert_status(await io.execute(exist), SCT_GENERIC, sc)


async def test_store_with_bad_key_length_requests_no_data() -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        cmd = await io.submit(_with_key_length(store_command(KV_NSID, b"k", 4096), 0))
        completion, _ = await io.response(cmd.cid)  # an R2T here would fail the test
        assert_status(completion, SCT_GENERIC, KvStatus.INVALID_KEY_SIZE)


async def test_cid_reused_while_its_data_is_outstanding() -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        first = store_command(KV_NSID, b"cid-first", 4096, cid=77)
        await io.send(io.capsule(first))
        pdu = await io.recv_pdu()
        assert pdu.type == PduType.R2T
        _, ttag, _, _ = struct.unpack_from("<HHII", pdu.raw, 8)
        # a buggy host reuses CID 77 while the first Store still waits for its data
        await io.send(io.capsule(store_command(KV_NSID, b"cid-second", 4096, cid=77)))
        conflict, _ = await io.response(77)
        assert_status(conflict, SCT_GENERIC, GenericStatus.CID_CONFLICT)
        # the first Store still gets its data and completes
        value = os.urandom(4096)
        _, h2c = io.h2c_data(77, ttag, 0, value)
        await io.send(h2c)
        with anyio.fail_after(2):  # generous: it completes in milliseconds when it does
            done, _ = await io.response(77)
        assert_ok(done)
        sent = await io.submit(retrieve_command(KV_NSID, b"cid-first", 4096))
        completion, data = await io.response(sent.cid)
        assert_ok(completion)
        assert data == value


async def test_retrieve_and_exist_of_missing_key() -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        completion = await io.execute(retrieve_command(KV_NSID, b"missing", 4096))
        assert_status(completion, SCT_GENERIC, KvStatus.KEY_DOES_NOT_EXIST)
        assert completion.status.dnr
        completion = await io.execute(exist_command(KV_NSID, b"missing"))
        assert_status(completion, SCT_GENERIC, KvStatus.KEY_DOES_NOT_EXIST)
        with pytest.raises(KeyNotFound):
            await h.client.get(b"missing")


async def test_store_option_conflicts() -> None:
    async with harness() as h, raw_controller(h.rt) as (_, io, _cntlid):
        value = b"first value"
        assert_ok(await io.execute(store_command(KV_NSID, b"once", len(value)), value))
        must_not = store_command(KV_NSID, b"once", 5, options=StoreOption.MUST_NOT_EXIST)
        completion = await io.execute(must_not, b"again")
        assert_status(completion, SCT_GENERIC, KvStatus.KEY_EXISTS)
        assert completion.status.dnr
        must = store_command(KV_NSID, b"absent", 5, options=StoreOption.MUST_EXIST)
        completion = await io.execute(must, b"again")
        assert_status(completion, SCT_GENERIC, KvStatus.KEY_DOES_NOT_EXIST)
        # the existing value is untouched
        sent = await io.submit(retrieve_command(KV_NSID, b"once", 64))
        completion, data = await io.response(sent.cid)
        assert_ok(completion)
        assert data == value


async def test_connect_to_unknown_subsystem() -> None:
    async with harness() as h, raw_queue(h.rt.address) as q:
        await q.handshake()
        completion = await q.connect("nqn.2024-01.io.gpucache:no-such-subsystem")
        assert_status(completion, SCT_SPECIFIC, FabricsStatus.CONNECT_INVALID_PARAMETERS)
        assert completion.dw0 == 0x00010100  # IATTR (in the data), IPO 256 (SUBNQN)
        assert completion.status.dnr
        # the queue is still unconnected: a proper Connect works
        assert_ok(await q.connect(h.rt.nqn))


async def test_connect_from_host_not_allowed() -> None:
    allowed = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000a110"
    neighbour, _ = default_host_identity()  # the well-behaved client's host NQN
    target = make_kv_target(hosts=[allowed, neighbour])
    async with harness(target) as h, raw_queue(h.rt.address) as q:
        await q.handshake()
        stranger = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000bad00"
        completion = await q.connect(h.rt.nqn, hostnqn=stranger)
        assert_status(completion, SCT_SPECIFIC, FabricsStatus.CONNECT_INVALID_HOST)
        assert completion.status.dnr
        assert_ok(await q.connect(h.rt.nqn, hostnqn=allowed))


async def test_io_connect_with_unknown_cntlid() -> None:
    async with harness() as h, raw_controller(h.rt) as (_, _io, cntlid):
        async with raw_queue(h.rt.address) as q:
            await q.handshake()
            completion = await q.connect(h.rt.nqn, qid=1, cntlid=(cntlid + 17) % 0xFFEF + 1)
            assert_status(completion, SCT_SPECIFIC, FabricsStatus.CONNECT_INVALID_PARAMETERS)
            assert completion.dw0 & (1 << 16), "IATTR: the bad field is in the connect data"
            assert completion.dw0 & 0xFFFF == 16  # CNTLID
        async with raw_queue(h.rt.address) as q:
            # the right CNTLID from another host is no better
            other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000042"
            await q.handshake()
            completion = await q.connect(h.rt.nqn, qid=1, cntlid=cntlid, hostnqn=other)
            assert_status(completion, SCT_SPECIFIC, FabricsStatus.CONNECT_INVALID_PARAMETERS)
            assert completion.dw0 & (1 << 16)


@pytest.mark.parametrize(
    ("fields", "dw0"),
    [
        ({"qid": 3}, 42),  # two I/O queues were granted: QID is SQE byte 42
        ({"qid": 2, "sqsize": 0}, 44),  # SQSIZE 0 is invalid: SQE byte 44
        ({"qid": 0, "sqsize": 0}, 44),
        ({"qid": 2, "sqsize": 1024}, 44),  # beyond CAP.MQES (1023)
        ({"qid": 0, "sqsize": 0x1000}, 44),
    ],
)
async def test_connect_invalid_sqe_fields(fields: dict[str, int], dw0: int) -> None:
    async with (
        harness() as h,
        raw_controller(h.rt, granted=2) as (_, _io, cntlid),
        raw_queue(h.rt.address) as q,
    ):
        await q.handshake()
        cntl = cntlid if fields["qid"] else DYNAMIC_CNTLID
        completion = await q.connect(h.rt.nqn, cntlid=cntl, **fields)
        assert_status(completion, SCT_SPECIFIC, FabricsStatus.CONNECT_INVALID_PARAMETERS)
        assert completion.dw0 == dw0  # IATTR 0: the offset is in the SQE


@pytest.mark.parametrize(
    ("case", "offset"),
    [
        ("admin_cntlid_not_ffff", 16),
        ("subnqn_empty", 256),
        ("subnqn_not_terminated", 256),
        ("hostnqn_empty", 512),
        ("hostnqn_not_terminated", 512),
    ],
)
async def test_connect_invalid_data_fields(case: str, offset: int) -> None:
    async with harness() as h, raw_queue(h.rt.address) as q:
        await q.handshake()
        data = bytearray(ConnectData(HOSTID, DYNAMIC_CNTLID, h.rt.nqn, HOSTNQN).pack())
        if case == "admin_cntlid_not_ffff":
            data[16:18] = struct.pack("<H", 1)
        elif case.endswith("_empty"):
            data[offset : offset + 256] = bytes(256)
        else:
            data[offset : offset + 256] = b"n" * 256
        completion = await q.execute(connect_command(qid=0, sqsize=31), bytes(data))
        assert_status(completion, SCT_SPECIFIC, FabricsStatus.CONNECT_INVALID_PARAMETERS)
        assert completion.dw0 == (1 << 16) | offset  # IATTR: the bad field is in the data


async def test_connect_record_format() -> None:
    async with harness() as h, raw_queue(h.rt.address) as q:
        await q.handshake()
        data = ConnectData(HOSTID, DYNAMIC_CNTLID, h.rt.nqn, HOSTNQN).pack()
        cmd = connect_command(qid=0, sqsize=31)
        cmd = attrs.evolve(cmd, cdw10=cmd.cdw10 | 1)  # RECFMT 1
        completion = await q.execute(cmd, data)
        assert_status(completion, SCT_SPECIFIC, FabricsStatus.INCOMPATIBLE_FORMAT)
        assert completion.status.dnr


async def test_connect_io_queue_twice() -> None:
    async with (
        harness() as h,
        raw_controller(h.rt) as (_, _io, cntlid),
        raw_queue(h.rt.address) as q,
    ):
        await q.handshake()
        completion = await q.connect(h.rt.nqn, qid=1, cntlid=cntlid)
        assert_status(completion, SCT_SPECIFIC, FabricsStatus.CONTROLLER_BUSY)


@pytest.mark.parametrize(
    ("offset", "size"), [(0x20, 4), (0x30, 4), (0x08, 8), (0x14, 8), (0x00, 4), (0x1000, 4)]
)
async def test_property_get_unsupported(offset: int, size: int) -> None:
    async with harness() as h, raw_controller(h.rt) as (admin, _, _cntlid):
        completion = await admin.execute(property_get_command(offset, size=size))
        assert_status(completion, SCT_GENERIC, GenericStatus.INVALID_FIELD)


async def test_property_set_unsupported_and_bad_attrib() -> None:
    async with harness() as h, raw_controller(h.rt) as (admin, _, _cntlid):
        for cmd in (
            property_set_command(PropertyOffset.CAP, 0, size=8),
            property_set_command(PropertyOffset.CSTS, 0),
            attrs.evolve(property_get_command(PropertyOffset.VS), cdw10=0x5),  # ATTRIB reserved
        ):
            completion = await admin.execute(cmd)
            assert_status(completion, SCT_GENERIC, GenericStatus.INVALID_FIELD)
        version = await admin.execute(property_get_command(PropertyOffset.VS))
        assert_ok(version)
        assert version.dw0 >= 0x00010300


# --------------------------------------------------------------------------------------------------
# Everything at once, next to the well-behaved client
# --------------------------------------------------------------------------------------------------
async def test_hammer_everything_concurrently() -> None:
    async with harness() as h:
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                for scenario in TRANSPORT_SCENARIOS:
                    tg.start_soon(scenario, h.rt)
        assert h.rt.target is not None
        controllers = h.rt.target.subsystems[h.rt.nqn].controllers
        await eventually(lambda: len(controllers) == 1)  # only the neighbour's remains


# --------------------------------------------------------------------------------------------------
# Keep alive
# --------------------------------------------------------------------------------------------------
async def test_keep_alive_timeout_tears_down_a_silent_controller() -> None:
    async with harness() as h:
        assert h.rt.target is not None
        controllers = h.rt.target.subsystems[h.rt.nqn].controllers
        silent = await Controller.connect(h.rt.address, h.rt.nqn, kato_ms=1000, timeout=5.0)
        alive = await Controller.connect(h.rt.address, h.rt.nqn, kato_ms=1000, timeout=5.0)
        try:
            assert silent.cntlid in controllers
            assert alive.cntlid in controllers
            async with anyio.create_task_group() as tg:
                tg.start_soon(alive.run_keep_alive)
                await eventually(lambda: silent.cntlid not in controllers, timeout=10)
                # the silent one is gone: its queues were closed under it
                with pytest.raises(ConnectionLost):
                    await silent.keep_alive()
                with pytest.raises(ConnectionLost):
                    await silent.execute_io(exist_command(KV_NSID, b"pre-small"), timeout=5)
                # the one sending Keep Alive outlives another full KATO
                await anyio.sleep(1.5)
                assert alive.cntlid in controllers
                await alive.keep_alive()
                completion = await alive.execute_io(exist_command(KV_NSID, b"pre-small"))
                assert completion.status.success
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await silent.close(shutdown=False)
                await alive.close()


async def test_keep_alive_after_teardown_on_a_raw_queue() -> None:
    """A raw admin queue with KATO 1000 ms that stays silent is closed by the target."""
    async with harness() as h, raw_queue(h.rt.address) as admin:
        await admin.handshake()
        assert_ok(await admin.connect(h.rt.nqn, kato_ms=1000))
        assert_ok(await admin.execute(property_set_command(PropertyOffset.CC, ENABLE_CC)))
        with anyio.fail_after(10):
            while True:
                try:
                    chunk = admin.sock.recv(1)
                except BlockingIOError:
                    await anyio.wait_readable(admin.sock)
                    continue
                except ConnectionResetError:
                    chunk = b""
                assert chunk == b"", "nothing but the close is expected"
                break


# --------------------------------------------------------------------------------------------------
# Initiator side: a dying target, a silent target
# --------------------------------------------------------------------------------------------------
def in_flight(ctrl: Controller) -> int:
    return ctrl.admin.in_flight + sum(q.in_flight for q in ctrl.io_queues)


async def test_target_process_death_fails_every_waiter() -> None:
    with anyio.fail_after(TEST_TIMEOUT), spawn_target("--capacity", "64MiB") as rt:
        assert rt.process is not None
        async with KVClient.connect(rt.address, rt.nqn, io_queues=2, timeout=None) as client:
            await client.put(b"before", b"x" * 1000)
            assert await client.get(b"before") == b"x" * 1000
            ctrl = client.controller
            os.kill(rt.process.pid, signal.SIGSTOP)  # commands now wait on a frozen target
            try:
                with pytest.raises(CommandTimeout):
                    await ctrl.execute_io(exist_command(KV_NSID, b"before"), timeout=0.3)
                outcomes: list[BaseException | None] = []

                async def waiter(op: Callable[[], Awaitable[object]]) -> None:
                    try:
                        await op()
                    except BaseException as exc:
                        outcomes.append(exc)
                        if not isinstance(exc, ConnectionLost):
                            raise
                    else:
                        outcomes.append(None)

                ops: list[Callable[[], Awaitable[object]]] = [
                    lambda: client.get(b"before"),
                    lambda: client.put(b"during", b"y" * 50_000),
                    lambda: client.exists(b"before"),
                    lambda: client.get(b"before"),
                    lambda: ctrl.admin.execute(identify_command(Cns.CONTROLLER)),
                    lambda: ctrl.admin.execute(async_event_request_command()),
                ]
                async with anyio.create_task_group() as tg:
                    for op in ops:
                        tg.start_soon(waiter, op)
                    # every op is on the wire, plus the timed-out (abandoned) command
                    await eventually(lambda: in_flight(ctrl) >= len(ops) + 1)
                    rt.process.kill()
                assert len(outcomes) == len(ops)
                assert all(isinstance(o, ConnectionLost) for o in outcomes), outcomes
                # and later commands fail at once the same way
                with pytest.raises(ConnectionLost):
                    await client.get(b"before")
                with pytest.raises(ConnectionLost):
                    await ctrl.keep_alive()
            finally:
                if rt.process.poll() is None:
                    rt.process.kill()
                rt.process.wait()


async def test_command_timeout_against_a_silent_target() -> None:
    """A 'target' that answers ICReq and then never again: Connect times out."""
    closed = anyio.Event()
    seen: list[bytes] = []

    async def silent(stream: anyio.abc.SocketStream) -> None:
        got = bytearray()
        try:
            while len(got) < 128:
                got += await stream.receive(128 - len(got))
            await stream.send(bytes(ICResp().to_bytes()))
            while True:
                seen.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            closed.set()
        finally:
            await stream.aclose()

    with anyio.fail_after(TEST_TIMEOUT):
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, silent)
                with pytest.raises(CommandTimeout):
                    await Controller.connect(("127.0.0.1", port), "nqn.x:silent", timeout=0.5)
                # the Connect capsule did arrive, and the initiator hung up afterwards
                with anyio.fail_after(5):
                    await closed.wait()
                raw = b"".join(seen)
                assert raw[:1] == bytes([PduType.CAPSULE_CMD])
                assert raw[8] == AdminOpcode.FABRICS
                tg.cancel_scope.cancel()
