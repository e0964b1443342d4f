"""Sans-IO NVMe/TCP connections: ``HostConnection`` and ``ControllerConnection``.

No sockets, no clock. The adapter loop is::

    view = conn.wants()                  # where the next received bytes must land
    n = sock.recv_into(view)
    conn.received(n)                     # n == 0: EOF
    while (event := conn.next_event()) is not None: ...
    sock.sendmsg(conn.data_to_send())

The receive side counts bytes like SPDK (common header -> rest of header -> payload -> data
digest), so it always knows where the next bytes go: headers and small payloads land in an internal
buffer (many PDUs parsed from one recv), large payloads straight in the caller's destination views.
Which PDU may arrive in which state is the table ``TRANSITIONS``; anything else is a
``PduError`` with the termination PDU already queued (h2's GOAWAY-first rule).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from enum import Enum

from nvmeof.errors import PduError, ProtocolError
from nvmeof.tcp.events import (
    CommandReceived,
    ConnectionClosed,
    ConnectionParams,
    DataDigestError,
    DataReceived,
    Event,
    ICReqReceived,
    ICRespReceived,
    R2TReceived,
    ResponseReceived,
    TermReqReceived,
)
from nvmeof.tcp.pdu import (
    ALLOWED_FLAGS,
    COMMON_HEADER_SIZE,
    CQE_SIZE,
    DIGEST_SIZE,
    FEI_CCCID,
    FEI_DATAL,
    FEI_DATAO,
    FEI_DIGEST,
    FEI_FLAGS,
    FEI_MAXH2CDATA,
    FEI_PDA,
    FEI_PDO,
    FEI_PFV,
    FEI_PLEN,
    FEI_TTAG,
    HEADER_DIGEST_TYPES,
    HLEN,
    IC_PDU_SIZE,
    MAX_PDA,
    R2T,
    SQE_SIZE,
    TERM_REQ_HEADER_SIZE,
    TERM_REQ_MAX_DATA,
    TERM_REQ_MAX_PLEN,
    Buffer,
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
    crc32c_of,
    pack_digest,
    unpack_digest,
)

__all__ = [
    "CONTROLLER_TRANSITIONS",
    "HOST_TRANSITIONS",
    "CommandReceived",
    "ConnectionClosed",
    "ConnectionParams",
    "ConnectionState",
    "ControllerConnection",
    "DataDigestError",
    "DataReceived",
    "Event",
    "HostConnection",
    "ICReqReceived",
    "ICRespReceived",
    "R2TReceived",
    "ResponseReceived",
    "TermReqReceived",
]

_FES = FatalErrorStatus


class ConnectionState(Enum):
    IDLE = "IDLE"  # host, before initiate()
    AWAIT_ICRESP = "AWAIT_ICRESP"  # host, ICReq sent
    AWAIT_ICREQ = "AWAIT_ICREQ"  # controller, fresh connection
    READY = "READY"
    ERROR = "ERROR"  # we raised PduError / sent a TermReq; sticky
    CLOSED = "CLOSED"  # EOF or the peer's TermReq; sticky


_S = ConnectionState
_T = PduType

#: (state, received PDU type) -> next state, per role. Not in the table -> PDU sequence error.
HOST_TRANSITIONS: dict[tuple[ConnectionState, PduType], ConnectionState] = {
    (_S.IDLE, _T.C2H_TERM_REQ): _S.CLOSED,
    (_S.AWAIT_ICRESP, _T.IC_RESP): _S.READY,
    (_S.AWAIT_ICRESP, _T.C2H_TERM_REQ): _S.CLOSED,
    (_S.READY, _T.CAPSULE_RESP): _S.READY,
    (_S.READY, _T.C2H_DATA): _S.READY,
    (_S.READY, _T.R2T): _S.READY,
    (_S.READY, _T.C2H_TERM_REQ): _S.CLOSED,
}
CONTROLLER_TRANSITIONS: dict[tuple[ConnectionState, PduType], ConnectionState] = {
    (_S.AWAIT_ICREQ, _T.IC_REQ): _S.READY,
    (_S.AWAIT_ICREQ, _T.H2C_TERM_REQ): _S.CLOSED,
    (_S.READY, _T.CAPSULE_CMD): _S.READY,
    (_S.READY, _T.H2C_DATA): _S.READY,
    (_S.READY, _T.H2C_TERM_REQ): _S.CLOSED,
}


class _Phase(Enum):
    CH = 0  # waiting for the 8-byte common header
    HEADER = 1  # waiting for the rest of the header (PSH, HDGST, pad) or a whole TermReq
    PAYLOAD = 2  # filling destination segments
    DDGST = 3  # waiting for the 4-byte data digest


_MIN_RECEIVE_BUFFER = 1024


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


class _Scatter:
    """A list of views addressed as one byte range; slicing returns views, never copies."""

    __slots__ = ("starts", "total", "views")

    def __init__(self, buffers: Iterable[Buffer]) -> None:
        self.views = [_byte_view(b) for b in buffers]
        self.starts: list[int] = []
        total = 0
        for view in self.views:
            self.starts.append(total)
            total += len(view)
        self.total = total

    def slice(self, offset: int, length: int) -> list[memoryview]:
        out: list[memoryview] = []
        i = bisect.bisect_right(self.starts, offset) - 1
        while length > 0:
            view = self.views[i]
            start = offset - self.starts[i]
            k = min(len(view) - start, length)
            if k > 0:
                out.append(view[start : start + k])
                offset += k
                length -= k
            i += 1
        return out


class _Pull:
    """Controller side of one ``request_data`` transfer (one R2T for the whole length)."""

    __slots__ = ("cid", "digest_ok", "into", "received", "ttag")

    def __init__(self, cid: int, into: memoryview, ttag: int) -> None:
        self.cid = cid
        self.into = into
        self.ttag = ttag
        self.received = 0
        self.digest_ok = True


class _Read:
    """Host side of one command's controller-to-host data."""

    __slots__ = ("received", "scatter")

    def __init__(self, scatter: _Scatter) -> None:
        self.scatter = scatter
        self.received = 0


class _Connection:
    """The receive machinery and send queue both roles share."""

    _transitions: dict[tuple[ConnectionState, PduType], ConnectionState]
    _receivable: frozenset[int]
    _term_type: PduType

    def __init__(self, *, state: ConnectionState, receive_buffer_size: int) -> None:
        if receive_buffer_size < _MIN_RECEIVE_BUFFER:
            raise ValueError(f"receive_buffer_size must be >= {_MIN_RECEIVE_BUFFER}")
        self.params: ConnectionParams | None = None
        self._state = state
        self._events: deque[Event] = deque()
        self._out: list[Buffer] = []
        # receive buffer: unparsed bytes live in [_rstart, _rend)
        self._rbuf = bytearray(receive_buffer_size)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        self._min_free = min(4096, receive_buffer_size // 4)
        self._direct_min = min(16384, receive_buffer_size // 4)
        self._phase = _Phase.CH
        self._wants_len = 0
        self._direct = False
        # the PDU being received
        self._ch = CommonHeader(0, 0, 0, 0, 0)
        self._ptype = PduType.IC_REQ
        self._hdr_size = 0
        self._hd = False
        self._dd = False
        self._datal = 0  # data bytes implied by PLEN/PDO/DDGSTF
        self._segs: list[memoryview] = []
        self._seg_i = 0
        self._seg_off = 0
        self._payload_left = 0

    # -- public ------------------------------------------------------------------------------
    @property
    def state(self) -> ConnectionState:
        return self._state

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> list[Buffer]:
        out, self._out = self._out, []
        return out

    def send_term_req(self, fes: int, fei: int = 0) -> None:
        """Terminate the connection by our own decision (no offending header attached)."""
        if self._state in (_S.ERROR, _S.CLOSED):
            return
        self._out.append(TermReq(fes, fei).to_bytes(self._term_type))
        self._state = _S.ERROR

    def wants(self) -> memoryview:
        """The non-empty view the next received bytes must land in."""
        self._check_open()
        if self._phase is _Phase.PAYLOAD and self._payload_left >= self._direct_min:
            view = self._segs[self._seg_i][self._seg_off :]
            self._direct = True
        else:
            if self._rstart == self._rend:
                self._rstart = self._rend = 0
            elif len(self._rbuf) - self._rend < self._min_free:
                n = self._rend - self._rstart
                self._rbuf[:n] = self._rview[self._rstart : self._rend]
                self._rstart, self._rend = 0, n
            view = self._rview[self._rend :]
            self._direct = False
        self._wants_len = len(view)
        return view

    def received(self, n: int) -> None:
        """``n`` bytes landed in the last ``wants()`` view; 0 means EOF."""
        self._check_open()
        if n == 0:
            clean = self._phase is _Phase.CH and self._rstart == self._rend
            self._state = _S.CLOSED
            self._events.append(ConnectionClosed(clean))
            return
        if n < 0 or n > self._wants_len:
            raise ValueError(f"received({n}) but the last wants() view held {self._wants_len}")
        self._wants_len = 0
        if self._direct:
            self._direct = False
            self._advance(n)
        else:
            self._rend += n
        self._parse()

    def receive_data(self, data: Buffer) -> None:
        """Copy ``data`` through wants()/received(); empty ``data`` means EOF (like h11)."""
        src = _byte_view(data)
        if not src:
            self.received(0)
            return
        while src and self._state not in (_S.ERROR, _S.CLOSED):
            view = self.wants()
            k = min(len(view), len(src))
            view[:k] = src[:k]
            src = src[k:]
            self.received(k)

    # -- receive machinery -------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state in (_S.ERROR, _S.CLOSED):
            raise ProtocolError(f"connection is {self._state.value}")

    def _fail(self, message: str, fes: int, fei: int = 0, header_bytes: int = 0) -> PduError:
        """Queue the termination PDU (with the offending header), go to ERROR, return the error."""
        avail = self._rend - self._rstart
        size = min(header_bytes or COMMON_HEADER_SIZE, avail, TERM_REQ_MAX_DATA)
        offending = self._rview[self._rstart : self._rstart + size]
        self._out.append(TermReq(fes, fei).to_bytes(self._term_type, offending))
        self._state = _S.ERROR
        return PduError(message, fes=fes, fei=fei)

    def _advance(self, n: int) -> None:
        self._payload_left -= n
        self._seg_off += n
        if self._seg_off == len(self._segs[self._seg_i]):
            self._seg_i += 1
            self._seg_off = 0

    def _expect_payload(self, segs: list[memoryview]) -> None:
        self._segs = segs
        self._seg_i = 0
        self._seg_off = 0
        self._payload_left = self._datal

    def _parse(self) -> None:
        while self._state not in (_S.ERROR, _S.CLOSED):
            avail = self._rend - self._rstart
            phase = self._phase
            if phase is _Phase.CH:
                if avail < COMMON_HEADER_SIZE:
                    return
                self._check_common_header()
                self._phase = _Phase.HEADER
            elif phase is _Phase.HEADER:
                if avail < self._hdr_size:
                    return
                self._handle_header()
            elif phase is _Phase.PAYLOAD:
                while self._payload_left and avail:
                    seg = self._segs[self._seg_i]
                    k = min(len(seg) - self._seg_off, avail)
                    seg[self._seg_off : self._seg_off + k] = self._rview[
                        self._rstart : self._rstart + k
                    ]
                    self._rstart += k
                    avail -= k
                    self._advance(k)
                if self._payload_left:
                    return
                if self._dd:
                    self._phase = _Phase.DDGST
                else:
                    self._phase = _Phase.CH
                    self._payload_done(True)
            else:  # DDGST
                if avail < DIGEST_SIZE:
                    return
                ok = unpack_digest(self._rview, self._rstart) == crc32c_of(self._segs)
                self._rstart += DIGEST_SIZE
                self._phase = _Phase.CH
                self._payload_done(ok)

    def _check_common_header(self) -> None:
        """Validate the 8-byte CH before trusting any length in it (SPDK nvmf_tcp_pdu_ch_handle)."""
        ch = CommonHeader.unpack_from(self._rview, self._rstart)
        self._ch = ch
        if ch.pdu_type not in self._receivable:
            raise self._fail(f"unknown PDU type 0x{ch.pdu_type:02x}", _FES.INVALID_HEADER_FIELD)
        ptype = PduType(ch.pdu_type)
        self._ptype = ptype
        if (self._state, ptype) not in self._transitions:
            raise self._fail(
                f"{ptype.name} not allowed in state {self._state.value}", _FES.PDU_SEQUENCE_ERROR
            )
        hlen = HLEN[ptype]
        if ch.hlen != hlen:
            raise self._fail(f"{ptype.name} HLEN {ch.hlen} != {hlen}", _FES.INVALID_HEADER_FIELD, 2)
        if ptype in (_T.H2C_TERM_REQ, _T.C2H_TERM_REQ):
            # Buffer the whole TermReq (<= 152 bytes); flags and PDO are not checked: the peer is
            # leaving anyway (the Linux host accepts PLEN 24..152 the same way).
            if not TERM_REQ_HEADER_SIZE <= ch.plen <= TERM_REQ_MAX_PLEN:
                raise self._fail(f"TermReq PLEN {ch.plen}", _FES.INVALID_HEADER_FIELD, FEI_PLEN)
            self._hd = self._dd = False
            self._hdr_size = ch.plen
            self._datal = 0
            return
        if ch.flags & ~ALLOWED_FLAGS[ptype]:
            raise self._fail(
                f"{ptype.name} flags 0x{ch.flags:02x}", _FES.INVALID_HEADER_FIELD, FEI_FLAGS
            )
        hd = bool(ch.flags & PduFlags.HDGSTF)
        dd = bool(ch.flags & PduFlags.DDGSTF)
        params = self.params
        if ptype in HEADER_DIGEST_TYPES:
            assert params is not None  # only READY admits these types
            if hd != params.header_digest:
                raise self._fail("HDGSTF contrary to negotiation", _FES.INVALID_HEADER_FIELD, 1)
        hsz = hlen + (DIGEST_SIZE if hd else 0)
        self._hd, self._dd = hd, dd
        self._datal = 0
        self._hdr_size = hsz
        if ptype in (_T.IC_REQ, _T.IC_RESP):
            if ch.plen != IC_PDU_SIZE:
                raise self._fail(f"{ptype.name} PLEN {ch.plen}", _FES.INVALID_HEADER_FIELD, 4)
            if ch.pdo != 0:
                raise self._fail(f"{ptype.name} PDO {ch.pdo}", _FES.INVALID_HEADER_FIELD, 3)
            return
        if ch.plen < hsz:
            raise self._fail(f"{ptype.name} PLEN {ch.plen} < {hsz}", _FES.INVALID_HEADER_FIELD, 4)
        if ptype in (_T.CAPSULE_RESP, _T.R2T):
            if ch.plen != hsz:
                raise self._fail(f"{ptype.name} PLEN {ch.plen}", _FES.INVALID_HEADER_FIELD, 4)
            if ch.pdo != 0:
                raise self._fail(f"{ptype.name} PDO {ch.pdo}", _FES.INVALID_HEADER_FIELD, 3)
            return
        assert params is not None
        if ptype is _T.CAPSULE_CMD and ch.plen == hsz:
            # No in-capsule data. PDO is not checked (hosts send 0); DDGSTF must be clear, as
            # the Linux host sets it only when the capsule carries data.
            if dd:
                raise self._fail("DDGSTF on a capsule without data", _FES.INVALID_HEADER_FIELD, 1)
            return
        # a PDU carrying data: CapsuleCmd with in-capsule data, H2CData, C2HData
        if dd != params.data_digest:
            raise self._fail("DDGSTF contrary to negotiation", _FES.INVALID_HEADER_FIELD, 1)
        unit = (self._rx_pda() + 1) * 4
        if ch.pdo < hsz or ch.pdo % unit:
            raise self._fail(f"{ptype.name} PDO {ch.pdo}", _FES.INVALID_HEADER_FIELD, FEI_PDO)
        ddsz = DIGEST_SIZE if dd else 0
        if ch.plen <= ch.pdo + ddsz:
            raise self._fail(
                f"{ptype.name} PLEN {ch.plen} leaves no data", _FES.INVALID_HEADER_FIELD, FEI_PLEN
            )
        self._hdr_size = ch.pdo
        self._datal = ch.plen - ch.pdo - ddsz
        self._check_data_length(ptype, self._datal)

    def _handle_header(self) -> None:
        """The whole header is buffered at ``_rstart``: check HDGST, then let the role handle it."""
        ch = self._ch
        ptype = self._ptype
        hdr = self._rview[self._rstart : self._rstart + self._hdr_size]
        hlen = ch.hlen
        hdr_bytes = hlen + (DIGEST_SIZE if self._hd else 0)
        if self._hd and unpack_digest(hdr, hlen) != crc32c_of((hdr[:hlen],)):
            raise self._fail("header digest mismatch", _FES.HEADER_DIGEST_ERROR, 0, hdr_bytes)
        next_state = self._transitions[(self._state, ptype)]
        if ptype in (_T.H2C_TERM_REQ, _T.C2H_TERM_REQ):
            term = TermReq.unpack_from(hdr)
            self._rstart += self._hdr_size
            self._state = next_state
            self._events.append(TermReqReceived(term.fes, term.fei))
            return
        self._on_header(ptype, ch, hdr, hdr_bytes)
        self._rstart += self._hdr_size
        self._state = next_state
        self._phase = _Phase.PAYLOAD if self._datal else _Phase.CH

    def _queue_pdu(
        self, header: bytearray, payload: Sequence[memoryview], data_digest: bool
    ) -> None:
        self._out.append(header)
        if payload:
            self._out.extend(payload)
            if data_digest:
                self._out.append(pack_digest(crc32c_of(payload)))

    # -- role hooks ----------------------------------------------------------------------------
    def _rx_pda(self) -> int:
        raise NotImplementedError

    def _check_data_length(self, ptype: PduType, datal: int) -> None:
        """Limit checks that need only PLEN (before the header is buffered)."""

    def _on_header(self, ptype: PduType, ch: CommonHeader, hdr: memoryview, hdr_bytes: int) -> None:
        raise NotImplementedError

    def _payload_done(self, digest_ok: bool) -> None:
        raise NotImplementedError


class HostConnection(_Connection):
    """The host (initiator) end of one NVMe/TCP connection (one queue)."""

    _transitions = HOST_TRANSITIONS
    _receivable = frozenset({_T.IC_RESP, _T.C2H_TERM_REQ, _T.CAPSULE_RESP, _T.C2H_DATA, _T.R2T})
    _term_type = _T.H2C_TERM_REQ

    def __init__(
        self,
        *,
        header_digest: bool = False,
        data_digest: bool = False,
        hpda: int = 0,
        maxr2t: int = 0,
        receive_buffer_size: int = 65536,
    ) -> None:
        if not 0 <= hpda <= MAX_PDA:
            raise ValueError(f"hpda {hpda} not in 0..{MAX_PDA}")
        super().__init__(state=_S.IDLE, receive_buffer_size=receive_buffer_size)
        self._icreq = ICReq(0, hpda, header_digest, data_digest, maxr2t)
        self._writes: dict[int, _Scatter] = {}
        self._reads: dict[int, _Read] = {}
        self._cur_read: _Read | None = None
        self._cur_cccid = 0
        self._cur_success = False

    def initiate(self) -> None:
        """Queue the ICReq."""
        if self._state is not _S.IDLE:
            raise ProtocolError(f"initiate() in state {self._state.value}")
        self._out.append(self._icreq.to_bytes())
        self._state = _S.AWAIT_ICRESP

    def send_command(
        self,
        sqe: Buffer,
        *,
        in_capsule: Sequence[Buffer] = (),
        write: Sequence[Buffer] = (),
        read_into: Sequence[memoryview] = (),
    ) -> None:
        """Queue a CapsuleCmd; register ``write`` data for R2Ts and ``read_into`` for C2HData."""
        params = self._ready_params()
        sqe_view = _byte_view(sqe)
        if len(sqe_view) != SQE_SIZE:
            raise ValueError(f"SQE must be {SQE_SIZE} bytes, got {len(sqe_view)}")
        cid = int.from_bytes(sqe_view[2:4], "little")
        if cid in self._writes or cid in self._reads:
            raise ProtocolError(f"command {cid} already has data registered")
        icd = _Scatter(in_capsule)
        payload = icd.slice(0, icd.total)
        if write:
            self._writes[cid] = _Scatter(write)
        if read_into:
            reads = _Scatter(read_into)
            if any(v.readonly for v in reads.views):
                raise ValueError("read_into views must be writable")
            self._reads[cid] = _Read(reads)
        header = build_header(
            CapsuleCmdHeader(bytes(sqe_view)),
            header_digest=params.header_digest,
            data_length=icd.total,
            data_digest=params.data_digest,
            pda=params.cpda,
        )
        self._queue_pdu(header, payload, params.data_digest)

    def forget(self, cid: int) -> None:
        """Drop the data registrations of a command (timeout/abort); later PDUs for it are fatal."""
        self._writes.pop(cid, None)
        self._reads.pop(cid, None)

    def _ready_params(self) -> ConnectionParams:
        if self._state is not _S.READY or self.params is None:
            raise ProtocolError(f"cannot send commands in state {self._state.value}")
        return self.params

    def _rx_pda(self) -> int:
        return self._icreq.hpda

    def _on_header(self, ptype: PduType, ch: CommonHeader, hdr: memoryview, hdr_bytes: int) -> None:
        if ptype is _T.IC_RESP:
            self._on_icresp(ICResp.unpack_from(hdr))
        elif ptype is _T.CAPSULE_RESP:
            cqe = bytearray(hdr[8 : 8 + CQE_SIZE])
            self.forget(int.from_bytes(cqe[12:14], "little"))
            self._events.append(ResponseReceived(memoryview(cqe)))
        elif ptype is _T.R2T:
            self._on_r2t(R2T.unpack_from(hdr), hdr_bytes)
        else:  # C2H_DATA
            self._on_c2h(ch, C2HDataHeader.unpack_from(hdr), hdr_bytes)

    def _on_icresp(self, resp: ICResp) -> None:
        req = self._icreq
        # Linux host rule set (REFERENCE 1.4), except that a CPDA != 0 is honoured.
        if resp.pfv != 0:
            raise self._fail(f"ICResp PFV {resp.pfv}", _FES.INVALID_HEADER_FIELD, FEI_PFV, 128)
        if resp.cpda > MAX_PDA:
            raise self._fail(f"ICResp CPDA {resp.cpda}", _FES.INVALID_HEADER_FIELD, FEI_PDA, 128)
        if (resp.header_digest and not req.header_digest) or (
            resp.data_digest and not req.data_digest
        ):
            raise self._fail(
                "ICResp enables unrequested digest", _FES.INVALID_HEADER_FIELD, FEI_DIGEST, 128
            )
        if resp.maxh2cdata < 4096 or resp.maxh2cdata % 4:
            raise self._fail(
                f"ICResp MAXH2CDATA {resp.maxh2cdata}",
                _FES.INVALID_HEADER_FIELD,
                FEI_MAXH2CDATA,
                128,
            )
        self.params = ConnectionParams(
            header_digest=resp.header_digest,
            data_digest=resp.data_digest,
            cpda=resp.cpda,
            hpda=req.hpda,
            maxh2cdata=resp.maxh2cdata,
            maxr2t=req.maxr2t,
        )
        self._events.append(ICRespReceived(self.params))

    def _on_r2t(self, r2t: R2T, hdr_bytes: int) -> None:
        params = self.params
        assert params is not None
        write = self._writes.get(r2t.cccid)
        if write is None:
            raise self._fail(
                f"R2T for unknown command {r2t.cccid}",
                _FES.INVALID_HEADER_FIELD,
                FEI_CCCID,
                hdr_bytes,
            )
        if r2t.r2tl == 0:  # nothing to answer with: H2CData requires 0 < DATAL
            raise self._fail("R2T with R2TL 0", _FES.INVALID_HEADER_FIELD, FEI_DATAL, hdr_bytes)
        if r2t.r2to + r2t.r2tl > write.total:
            # SPDK host: FES 0x04, offset of R2TL
            raise self._fail(
                f"R2T {r2t.r2to}+{r2t.r2tl} beyond the {write.total} data bytes",
                _FES.DATA_TRANSFER_OUT_OF_RANGE,
                FEI_DATAL,
                hdr_bytes,
            )
        end = r2t.r2to + r2t.r2tl
        offset = r2t.r2to
        while offset < end:
            k = min(params.maxh2cdata, end - offset)
            last = offset + k == end
            payload = write.slice(offset, k)
            header = build_header(
                H2CDataHeader(r2t.cccid, r2t.ttag, offset, k),
                flags=PduFlags.LAST_PDU if last else 0,
                header_digest=params.header_digest,
                data_length=k,
                data_digest=params.data_digest,
                pda=params.cpda,
            )
            self._queue_pdu(header, payload, params.data_digest)
            offset += k
        self._events.append(R2TReceived(r2t.cccid, r2t.ttag, r2t.r2to, r2t.r2tl))

    def _on_c2h(self, ch: CommonHeader, hdr: C2HDataHeader, hdr_bytes: int) -> None:
        success = bool(ch.flags & PduFlags.SUCCESS)
        if success and not ch.flags & PduFlags.LAST_PDU:
            raise self._fail(
                "SUCCESS without LAST_PDU", _FES.INVALID_HEADER_FIELD, FEI_FLAGS, hdr_bytes
            )
        read = self._reads.get(hdr.cccid)
        if read is None:
            raise self._fail(
                f"C2HData for unknown command {hdr.cccid}",
                _FES.INVALID_HEADER_FIELD,
                FEI_CCCID,
                hdr_bytes,
            )
        if hdr.datal != self._datal:
            raise self._fail(
                f"DATAL {hdr.datal} != PLEN-PDO-DDGST {self._datal}",
                _FES.INVALID_HEADER_FIELD,
                FEI_DATAL,
                hdr_bytes,
            )
        if hdr.datao != read.received:
            raise self._fail(
                f"DATAO {hdr.datao}, expected {read.received}",
                _FES.INVALID_HEADER_FIELD,
                FEI_DATAO,
                hdr_bytes,
            )
        if hdr.datao + hdr.datal > read.scatter.total:
            raise self._fail(
                f"C2HData {hdr.datao}+{hdr.datal} beyond {read.scatter.total}",
                _FES.DATA_TRANSFER_OUT_OF_RANGE,
                FEI_DATAL,
                hdr_bytes,
            )
        self._cur_read = read
        self._cur_cccid = hdr.cccid
        self._cur_success = success
        self._expect_payload(read.scatter.slice(hdr.datao, hdr.datal))

    def _payload_done(self, digest_ok: bool) -> None:
        read = self._cur_read
        assert read is not None
        self._cur_read = None
        read.received += self._datal
        cccid = self._cur_cccid
        if not digest_ok:
            self._events.append(DataDigestError(cccid))
        if self._cur_success:
            cqe = bytearray(CQE_SIZE)
            cqe[12:14] = cccid.to_bytes(2, "little")
            self.forget(cccid)
            self._events.append(ResponseReceived(memoryview(cqe)))


class ControllerConnection(_Connection):
    """The controller (target) end of one NVMe/TCP connection (one queue)."""

    _transitions = CONTROLLER_TRANSITIONS
    _receivable = frozenset({_T.IC_REQ, _T.H2C_TERM_REQ, _T.CAPSULE_CMD, _T.H2C_DATA})
    _term_type = _T.C2H_TERM_REQ

    def __init__(
        self,
        *,
        maxh2cdata: int = 131072,
        cpda: int = 0,
        max_in_capsule_data: int = 8192,
        max_c2h_data: int = 131072,
        receive_buffer_size: int = 65536,
        allow_digests: bool = True,
    ) -> None:
        if not 0 <= cpda <= MAX_PDA:
            raise ValueError(f"cpda {cpda} not in 0..{MAX_PDA}")
        if maxh2cdata < 4096 or maxh2cdata % 4:
            raise ValueError("maxh2cdata must be a multiple of 4 and >= 4096")
        if max_c2h_data <= 0:
            raise ValueError("max_c2h_data must be positive")
        super().__init__(state=_S.AWAIT_ICREQ, receive_buffer_size=receive_buffer_size)
        self._maxh2cdata = maxh2cdata
        self._cpda = cpda
        self._max_icd = max_in_capsule_data
        self._max_c2h = max_c2h_data
        self._allow_digests = allow_digests
        self._pulls: dict[int, _Pull] = {}
        self._ttags: set[int] = set()
        self._ttag_counter = itertools.count(1)
        self._cur_sqe = bytearray()
        self._cur_icd = bytearray()
        self._cur_pull: _Pull | None = None

    # -- API -------------------------------------------------------------------------------------
    def set_max_in_capsule_data(self, n: int) -> None:
        """Admin queue 8192; I/O queues IOCCSZ*16-64, settable after Connect."""
        if n < 0:
            raise ValueError("max in-capsule data must be >= 0")
        self._max_icd = n

    def request_data(self, cid: int, into: memoryview) -> None:
        """Queue one R2T for ``len(into)`` bytes; the H2CData lands directly in ``into``."""
        self._ready_params()
        view = _byte_view(into)
        if not view:
            raise ValueError("request_data needs a non-empty destination")
        if view.readonly:
            raise ValueError("request_data destination must be writable")
        if cid in self._pulls:
            raise ProtocolError(f"command {cid} already has an R2T outstanding")
        ttag = self._new_ttag()
        self._pulls[cid] = _Pull(cid, view, ttag)
        self._queue_pdu(self._header(R2T(cid, ttag, 0, len(view))), (), False)

    def send_data(self, cid: int, data: Sequence[Buffer], *, success: bool = False) -> None:
        """Queue C2HData PDUs carrying ``data`` (views, not copies); SUCCESS on the last if set."""
        params = self._ready_params()
        scatter = _Scatter(data)
        if scatter.total == 0:
            raise ValueError("send_data needs at least one byte (C2HData DATAL > 0)")
        offset = 0
        while offset < scatter.total:
            k = min(self._max_c2h, scatter.total - offset)
            last = offset + k == scatter.total
            flags = 0
            if last:
                flags = PduFlags.LAST_PDU | (PduFlags.SUCCESS if success else 0)
            header = build_header(
                C2HDataHeader(cid, offset, k),
                flags=flags,
                header_digest=params.header_digest,
                data_length=k,
                data_digest=params.data_digest,
                pda=params.hpda,
            )
            self._queue_pdu(header, scatter.slice(offset, k), params.data_digest)
            offset += k

    def send_response(self, cqe: Buffer) -> None:
        """Queue a CapsuleResp."""
        self._ready_params()
        view = _byte_view(cqe)
        if len(view) != CQE_SIZE:
            raise ValueError(f"CQE must be {CQE_SIZE} bytes, got {len(view)}")
        self._queue_pdu(self._header(CapsuleRespHeader(bytes(view))), (), False)

    # -- internals -------------------------------------------------------------------------------
    def _ready_params(self) -> ConnectionParams:
        if self._state is not _S.READY or self.params is None:
            raise ProtocolError(f"cannot send in state {self._state.value}")
        return self.params

    def _header(self, psh: R2T | CapsuleRespHeader) -> bytearray:
        params = self.params
        assert params is not None
        return build_header(psh, header_digest=params.header_digest)

    def _new_ttag(self) -> int:
        # TTAG 1..0xFFFF, unique among outstanding R2Ts (SPDK uses slot+1; 0 is never used).
        for _ in range(0x10000):
            ttag = next(self._ttag_counter) & 0xFFFF
            if ttag and ttag not in self._ttags:
                self._ttags.add(ttag)
                return ttag
        raise ProtocolError("no free transfer tag")

    def _rx_pda(self) -> int:
        return self._cpda

    def _check_data_length(self, ptype: PduType, datal: int) -> None:
        if ptype is _T.CAPSULE_CMD and datal > self._max_icd:
            # SPDK answers an oversize capsule with an invalid PLEN too.
            raise self._fail(
                f"in-capsule data {datal} > {self._max_icd}", _FES.INVALID_HEADER_FIELD, FEI_PLEN
            )

    def _on_header(self, ptype: PduType, ch: CommonHeader, hdr: memoryview, hdr_bytes: int) -> None:
        if ptype is _T.IC_REQ:
            self._on_icreq(ICReq.unpack_from(hdr))
        elif ptype is _T.CAPSULE_CMD:
            self._cur_sqe = bytearray(hdr[8 : 8 + SQE_SIZE])
            if self._datal:
                self._cur_icd = bytearray(self._datal)
                self._cur_pull = None
                self._expect_payload([memoryview(self._cur_icd)])
            else:
                self._events.append(CommandReceived(memoryview(self._cur_sqe), None))
        else:  # H2C_DATA
            self._on_h2c(H2CDataHeader.unpack_from(hdr), hdr_bytes)

    def _on_icreq(self, req: ICReq) -> None:
        if req.pfv != 0:
            raise self._fail(f"ICReq PFV {req.pfv}", _FES.INVALID_HEADER_FIELD, FEI_PFV, 128)
        if req.hpda > MAX_PDA:
            raise self._fail(f"ICReq HPDA {req.hpda}", _FES.INVALID_HEADER_FIELD, FEI_PDA, 128)
        allow = self._allow_digests
        self.params = ConnectionParams(
            header_digest=req.header_digest and allow,
            data_digest=req.data_digest and allow,
            cpda=self._cpda,
            hpda=req.hpda,
            maxh2cdata=self._maxh2cdata,
            maxr2t=req.maxr2t,
        )
        resp = ICResp(
            pfv=0,
            cpda=self._cpda,
            header_digest=self.params.header_digest,
            data_digest=self.params.data_digest,
            maxh2cdata=self._maxh2cdata,
        )
        self._out.append(resp.to_bytes())
        self._events.append(ICReqReceived(self.params))

    def _on_h2c(self, hdr: H2CDataHeader, hdr_bytes: int) -> None:
        pull = self._pulls.get(hdr.cccid)
        if pull is None:
            raise self._fail(
                f"H2CData for command {hdr.cccid} without an R2T",
                _FES.INVALID_HEADER_FIELD,
                FEI_CCCID,
                hdr_bytes,
            )
        if hdr.ttag != pull.ttag:
            raise self._fail(
                f"H2CData TTAG {hdr.ttag} != {pull.ttag}",
                _FES.INVALID_HEADER_FIELD,
                FEI_TTAG,
                hdr_bytes,
            )
        if hdr.datal != self._datal:
            raise self._fail(
                f"DATAL {hdr.datal} != PLEN-PDO-DDGST {self._datal}",
                _FES.INVALID_HEADER_FIELD,
                FEI_DATAL,
                hdr_bytes,
            )
        if hdr.datal > self._maxh2cdata:
            raise self._fail(
                f"H2CData DATAL {hdr.datal} > MAXH2CDATA {self._maxh2cdata}",
                _FES.DATA_TRANSFER_LIMIT_EXCEEDED,
                FEI_DATAL,
                hdr_bytes,
            )
        if hdr.datao != pull.received:
            raise self._fail(
                f"H2CData DATAO {hdr.datao}, expected {pull.received}",
                _FES.INVALID_HEADER_FIELD,
                FEI_DATAO,
                hdr_bytes,
            )
        if hdr.datao + hdr.datal > len(pull.into):
            # SPDK: FES 0x04 with the offset of DATAL
            raise self._fail(
                f"H2CData {hdr.datao}+{hdr.datal} beyond the R2T window {len(pull.into)}",
                _FES.DATA_TRANSFER_OUT_OF_RANGE,
                FEI_DATAL,
                hdr_bytes,
            )
        self._cur_pull = pull
        self._cur_sqe = bytearray()
        self._expect_payload([pull.into[hdr.datao : hdr.datao + hdr.datal]])

    def _payload_done(self, digest_ok: bool) -> None:
        pull = self._cur_pull
        if pull is None:  # in-capsule data
            cid = int.from_bytes(self._cur_sqe[2:4], "little")
            if digest_ok:
                event: Event = CommandReceived(memoryview(self._cur_sqe), memoryview(self._cur_icd))
            else:
                event = DataDigestError(cid)
            self._events.append(event)
            return
        self._cur_pull = None
        pull.received += self._datal
        pull.digest_ok = pull.digest_ok and digest_ok
        if pull.received == len(pull.into):
            cid = pull.cid
            del self._pulls[cid]
            self._ttags.discard(pull.ttag)
            self._events.append(DataReceived(cid) if pull.digest_ok else DataDigestError(cid))
