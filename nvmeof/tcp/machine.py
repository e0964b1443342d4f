"""The receive machinery shared by both NVMe/TCP roles, and the per-role transition tables.

The receive side counts bytes like SPDK (common header -> rest of header -> payload -> data
digest), so it always knows where the next bytes go: headers and small payloads land in an internal
buffer (many PDUs parsed from one recv), large payloads straight in the caller's destination views,
never beyond the end of the current PDU's payload. Every length field is validated before it is
used. Which PDU may arrive in which state is ``HOST_TRANSITIONS`` / ``CONTROLLER_TRANSITIONS``;
anything else is a ``PduError`` with the termination PDU already queued (h2's GOAWAY-first rule).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Sequence
from enum import Enum

from nvmeof.errors import PduError, ProtocolError
from nvmeof.tcp.events import (
    ConnectionClosed,
    ConnectionParams,
    Event,
    TermReqReceived,
)
from nvmeof.tcp.pdu import (
    ALLOWED_FLAGS,
    COMMON_HEADER_SIZE,
    DIGEST_SIZE,
    FEI_DATAL,
    FEI_DATAO,
    FEI_FLAGS,
    FEI_PDO,
    FEI_PLEN,
    HEADER_DIGEST_TYPES,
    HLEN,
    IC_PDU_SIZE,
    TERM_REQ_HEADER_SIZE,
    TERM_REQ_MAX_DATA,
    TERM_REQ_MAX_PLEN,
    Buffer,
    CommonHeader,
    FatalErrorStatus,
    PduFlags,
    PduType,
    TermReq,
    crc32c_of,
    pack_digest,
    unpack_digest,
)

_FES = FatalErrorStatus

# Plain-int views of the enum tables: the header check runs for every PDU, and IntFlag/IntEnum
# arithmetic and construction cost microseconds each in CPython.
_PDU_TYPES: dict[int, PduType] = {int(t): t for t in PduType}
_ALLOWED: dict[PduType, int] = {t: int(f) for t, f in ALLOWED_FLAGS.items()}
_HDGSTF = int(PduFlags.HDGSTF)
_DDGSTF = int(PduFlags.DDGSTF)


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


def byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


class Scatter:
    """A list of views addressed as one byte range; slicing returns views, never copies."""

    __slots__ = ("starts", "total", "views")

    def __init__(self, buffers: Iterable[Buffer]) -> None:
        self.views = [byte_view(b) for b in buffers]
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


def _append_pdu(
    out: list[Buffer], header: bytearray, payload: Sequence[memoryview], data_digest: bool
) -> None:
    """A PDU's buffers: its header, its payload views, and the data digest when there is one."""
    out.append(header)
    if payload:
        out.extend(payload)
        if data_digest:
            out.append(pack_digest(crc32c_of(payload)))


class PduConnection:
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
        # Bulk data PDUs (a host's H2CData), each as (its buffers, its bytes), sent after ``_out``:
        # a command queued later overtakes them at a PDU boundary (see ``data_to_send``).
        self._bulk: deque[tuple[list[Buffer], int]] = deque()
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
        self._streaming = False  # the last payload went straight to its destination
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
        # CH prefixes of the PDU shapes a role sees most (CapsuleResp and C2HData, CapsuleCmd),
        # set once READY without digests: a PDU starting with one skips the general checks,
        # whose outcome for these bytes is known (``_on_fast_pdu``).
        self._fast_prefix: tuple[bytes, ...] = ()

    # -- public ------------------------------------------------------------------------------
    @property
    def state(self) -> ConnectionState:
        return self._state

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out) or bool(self._bulk)

    def data_to_send(self, limit: int | None = None) -> list[Buffer]:
        """The buffers to send next, in order: every PDU queued but bulk data, then bulk data
        PDUs (a host's H2CData), all of them or, with ``limit``, whole ones up to ``limit``
        bytes (at least one). A sender that takes bulk data ``limit`` bytes at a time lets a
        command queued meanwhile go out before the rest of it, instead of behind megabytes of
        other commands' data (PDUs of different commands may interleave; each command's own
        data stays in order, and its capsule is long gone when its R2T asks for it)."""
        out, self._out = self._out, []
        bulk = self._bulk
        taken = 0
        while bulk and (limit is None or not taken or taken + bulk[0][1] <= limit):
            buffers, size = bulk.popleft()
            out.extend(buffers)
            taken += size
        return out

    def send_term_req(self, fes: int, fei: int = 0) -> None:
        """Terminate the connection by our own decision (no offending header attached)."""
        if self._state in (_S.ERROR, _S.CLOSED):
            return
        self._queue_term_req(TermReq(fes, fei).to_bytes(self._term_type))
        self._state = _S.ERROR

    @property
    def between_pdus(self) -> bool:
        """Connected and idle at a PDU boundary (no partial PDU held). A peer that stalls
        anywhere else (before its ICReq, inside a header or payload) is one to time out."""
        return self._state is _S.READY and self._phase is _Phase.CH and self._rstart == self._rend

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
            if self._streaming:
                # Right after a payload received in place: the next PDU is likely another large
                # one, and whatever of its payload lands here must be copied out again. Take
                # little (its header and a bit), then let the payload go straight to its place.
                view = view[: self._direct_min]
            self._direct = False
        self._wants_len = len(view)
        return view

    @property
    def bytes_due(self) -> int:
        """Bytes of the last ``wants()`` view that are sure to come: all of it when it is the rest
        of a payload received in place (the PDU header promised them), else 1. A transport may
        wait for that many before it reads, instead of reading each little bit as it arrives."""
        return self._wants_len if self._direct else 1

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
            self._streaming = True
            self._advance(n)
        else:
            self._rend += n
        self._parse()

    def receive_data(self, data: Buffer) -> None:
        """Copy ``data`` through wants()/received(); empty ``data`` means EOF (like h11)."""
        self._check_open()
        src = byte_view(data)
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
        self._queue_term_req(TermReq(fes, fei).to_bytes(self._term_type, offending))
        self._state = _S.ERROR
        return PduError(message, fes=fes, fei=fei)

    def _check_data_window(
        self, datao: int, datal: int, expected: int, window: int, header_bytes: int
    ) -> None:
        """A data PDU (H2CData or C2HData) must say how much it carries (DATAL = PLEN - PDO -
        DDGST), continue exactly where the last one ended, and stay inside its transfer."""
        if datal != self._datal:
            raise self._fail(
                f"DATAL {datal} != PLEN-PDO-DDGST {self._datal}",
                _FES.INVALID_HEADER_FIELD,
                FEI_DATAL,
                header_bytes,
            )
        if datao != expected:
            raise self._fail(
                f"DATAO {datao}, expected {expected}",
                _FES.INVALID_HEADER_FIELD,
                FEI_DATAO,
                header_bytes,
            )
        if datao + datal > window:
            # SPDK: FES 0x04 with the offset of DATAL
            raise self._fail(
                f"data {datao}+{datal} beyond the transfer of {window} bytes",
                _FES.DATA_TRANSFER_OUT_OF_RANGE,
                FEI_DATAL,
                header_bytes,
            )

    def _advance(self, n: int) -> None:
        self._payload_left -= n
        self._seg_off += n
        if self._seg_off == len(self._segs[self._seg_i]):
            self._seg_i += 1
            self._seg_off = 0

    def _skip_to_payload(self, payload_start: int, datal: int, segs: list[memoryview]) -> None:
        """A fast path's header is handled: its payload (no digest) starts at ``payload_start``
        and lands in ``segs``."""
        self._hd = self._dd = False
        self._datal = datal
        if datal < self._direct_min:
            self._streaming = False
        self._rstart = payload_start
        self._phase = _Phase.PAYLOAD
        self._expect_payload(segs)

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
                if (
                    self._fast_prefix
                    and self._rbuf.startswith(self._fast_prefix, self._rstart)
                    and self._on_fast_pdu(avail)
                ):
                    if self._phase is _Phase.CH:
                        self._streaming = False  # a whole small PDU: read in bulk again
                    continue
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
        ptype = _PDU_TYPES[ch.pdu_type]
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
        if ch.flags & ~_ALLOWED[ptype]:
            raise self._fail(
                f"{ptype.name} flags 0x{ch.flags:02x}", _FES.INVALID_HEADER_FIELD, FEI_FLAGS
            )
        hd = bool(ch.flags & _HDGSTF)
        dd = bool(ch.flags & _DDGSTF)
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
        if self._datal < self._direct_min:
            self._streaming = False  # small PDUs again: read in bulk

    def _queue_pdu(
        self, header: bytearray, payload: Sequence[memoryview], data_digest: bool
    ) -> None:
        _append_pdu(self._out, header, payload, data_digest)

    def _queue_term_req(self, pdu: Buffer) -> None:
        # The last PDU on the connection: bulk data still queued would follow it, so it goes.
        self._bulk.clear()
        self._out.append(pdu)

    def _queue_bulk_pdu(
        self, header: bytearray, payload: Sequence[memoryview], data_digest: bool
    ) -> None:
        buffers: list[Buffer] = []
        _append_pdu(buffers, header, payload, data_digest)
        self._bulk.append((buffers, sum(map(len, buffers))))

    # -- role hooks ----------------------------------------------------------------------------
    def _on_fast_pdu(self, avail: int) -> bool:
        """Handle the PDU at ``_rstart`` (its CH starts with ``_fast_prefix``; ``avail`` bytes
        are buffered) exactly as the general path would, or return False to leave it to that."""
        return False

    def _rx_pda(self) -> int:
        raise NotImplementedError

    def _check_data_length(self, ptype: PduType, datal: int) -> None:
        """Limit checks that need only PLEN (before the header is buffered)."""

    def _on_header(self, ptype: PduType, ch: CommonHeader, hdr: memoryview, hdr_bytes: int) -> None:
        raise NotImplementedError

    def _payload_done(self, digest_ok: bool) -> None:
        raise NotImplementedError
