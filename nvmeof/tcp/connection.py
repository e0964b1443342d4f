"""Sans-IO NVMe/TCP connections: ``HostConnection`` and ``ControllerConnection``.

No sockets, no clock. The adapter loop is::

    view = conn.wants()                  # where the next received bytes must land
    n = sock.recv_into(view)
    conn.received(n)                     # n == 0: EOF
    while (event := conn.next_event()) is not None: ...
    sock.sendmsg(conn.data_to_send())

The receive machinery and the transition tables live in ``machine.py``; this module holds what
each role does with a parsed header (R2T answering, H2C/C2H bookkeeping, IC negotiation) and the
send-side API. Events are in ``events.py`` and re-exported here.

Choices where the references leave room (after SPDK lib/nvmf/tcp.c and lib/nvme/nvme_tcp.c):
- FEI for DATA_TRANSFER_OUT_OF_RANGE / LIMIT_EXCEEDED is the DATAL/R2TL offset (16), as SPDK.
- The controller sends one R2T for the whole ``request_data`` length (Linux/SPDK do the same),
  so MAXR2T+1 outstanding per command is always respected.
- In-capsule data is padded to CPDA like H2CData (spec: CPDA covers every H2C PDU with data).
- The host accepts an ICResp that declines a requested digest, and rejects one that enables a
  digest it did not ask for (FEI 11), CPDA > 31 (FEI 10), MAXH2CDATA < 4096 or % 4 != 0 (FEI 12).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence

from nvmeof.errors import ProtocolError
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
from nvmeof.tcp.machine import (
    CONTROLLER_TRANSITIONS,
    HOST_TRANSITIONS,
    ConnectionState,
    PduConnection,
    Scatter,
    byte_view,
)
from nvmeof.tcp.pdu import (
    CQE_SIZE,
    FEI_CCCID,
    FEI_DATAL,
    FEI_DIGEST,
    FEI_FLAGS,
    FEI_MAXH2CDATA,
    FEI_PDA,
    FEI_PFV,
    FEI_PLEN,
    FEI_TTAG,
    HLEN,
    MAX_PDA,
    R2T,
    SQE_SIZE,
    Buffer,
    C2HDataHeader,
    CapsuleRespHeader,
    CommonHeader,
    FatalErrorStatus,
    H2CDataHeader,
    ICReq,
    ICResp,
    PduFlags,
    PduType,
    build_header,
    c2h_data_header,
    capsule_cmd_header,
    capsule_resp_header,
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
_S = ConnectionState
_T = PduType
_U32 = struct.Struct("<I")
_RESP_SIZE = HLEN[_T.CAPSULE_RESP]
_RESP_CH = struct.pack("<BBBBI", _T.CAPSULE_RESP, 0, _RESP_SIZE, 0, _RESP_SIZE)
_CMD_HLEN = HLEN[_T.CAPSULE_CMD]
#: Where a command's in-capsule data lands: given its SQE and the data length, a writable buffer of
#: exactly that length (the command's final home, so a KV Store keeps it without a copy).
InCapsuleAllocator = Callable[[memoryview, int], "bytearray | memoryview"]
_CAPSULE_RESP = int(_T.CAPSULE_RESP)
_C2H_PDO = HLEN[_T.C2H_DATA]  # no header digest, HPDA 0
_LAST = int(PduFlags.LAST_PDU)
_LAST_SUCCESS = int(PduFlags.LAST_PDU | PduFlags.SUCCESS)
_C2H_PREFIXES = tuple(
    bytes([_T.C2H_DATA, flags, _C2H_PDO, _C2H_PDO])
    for flags in (0, PduFlags.LAST_PDU, _LAST_SUCCESS)
)
# PLEN (CH), then the C2HData PSH: CCCID, reserved, DATAO, DATAL
_C2H_FIELDS = struct.Struct("<IH2xII")
_NO_PAYLOAD: tuple[memoryview, ...] = ()
_CMD_CH_PREFIX = bytes([_T.CAPSULE_CMD, 0, _CMD_HLEN])


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

    def __init__(self, scatter: Scatter) -> None:
        self.scatter = scatter
        self.received = 0


class HostConnection(PduConnection):
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
        self.success_completions = 0  # C2HData with SUCCESS stood in for a CapsuleResp
        self._icreq = ICReq(0, hpda, header_digest, data_digest, maxr2t)
        self._writes: dict[int, Scatter] = {}
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
        sqe_view = byte_view(sqe)
        if len(sqe_view) != SQE_SIZE:
            raise ValueError(f"SQE must be {SQE_SIZE} bytes, got {len(sqe_view)}")
        cid = sqe_view[2] | sqe_view[3] << 8
        if cid in self._writes or cid in self._reads:
            raise ProtocolError(f"command {cid} already has data registered")
        payload: Sequence[memoryview]
        if in_capsule:
            payload = [view for view in map(byte_view, in_capsule) if view]
            total = sum(map(len, payload))
        else:  # most commands: no per-command list and sum
            payload = _NO_PAYLOAD
            total = 0
        if write:
            self._writes[cid] = Scatter(write)
        if read_into:
            reads = Scatter(read_into)
            for view in reads.views:
                if view.readonly:
                    raise ValueError("read_into views must be writable")
            self._reads[cid] = _Read(reads)
        header = capsule_cmd_header(
            sqe_view,
            header_digest=params.header_digest,
            data_length=total,
            data_digest=params.data_digest,
            pda=params.cpda,
        )
        self._queue_pdu(header, payload, params.data_digest)

    def next_response(self) -> ResponseReceived | None:
        """The next event if it is a ``ResponseReceived`` (the usual one), else None and the
        event stays for ``next_event``."""
        events = self._events
        if events and type(events[0]) is ResponseReceived:
            return events.popleft()  # type: ignore[return-value]
        return None

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

    def _on_fast_pdu(self, avail: int) -> bool:
        if avail < _RESP_SIZE:  # both shapes have a 24-byte header
            return False
        start = self._rstart
        rbuf = self._rbuf
        if rbuf[start] == _CAPSULE_RESP:  # type, flags 0, HLEN 24, PDO 0, PLEN 24
            cqe = bytearray(self._rview[start + 8 : start + _RESP_SIZE])
            self.forget(cqe[12] | cqe[13] << 8)
            self._events.append(ResponseReceived(memoryview(cqe)))
            self._rstart = start + _RESP_SIZE
            return True
        # C2HData, no digests, HPDA 0: PDO 24; flags 0, LAST_PDU or LAST_PDU|SUCCESS
        plen, cccid, datao, datal = _C2H_FIELDS.unpack_from(rbuf, start + 4)
        read = self._reads.get(cccid)
        if (
            read is None
            or plen <= _C2H_PDO
            or datal != plen - _C2H_PDO
            or datao != read.received
            or datao + datal > read.scatter.total
        ):
            return False  # the general path says what is wrong
        success = rbuf[start + 1] == _LAST_SUCCESS
        if avail >= plen:
            # Whole in the buffer (a small value): copy it out here, no payload phase.
            at = start + _C2H_PDO
            scatter = read.scatter
            # The usual small read is one PDU for the whole buffer: its views as they are.
            segs = scatter.views if datal == scatter.total else scatter.slice(datao, datal)
            rview = self._rview
            for seg in segs:
                end = at + len(seg)
                seg[:] = rview[at:end]
                at = end
            read.received += datal
            self._rstart = start + plen
            if success:
                self._complete_by_success(cccid)
            return True
        self._cur_read = read
        self._cur_cccid = cccid
        self._cur_success = success
        self._skip_to_payload(start + _C2H_PDO, datal, read.scatter.slice(datao, datal))
        return True

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
        if not resp.header_digest:
            self._fast_prefix = (_RESP_CH,)
            if not resp.data_digest and req.hpda == 0:
                self._fast_prefix += _C2H_PREFIXES
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
            self._queue_bulk_pdu(header, payload, params.data_digest)
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
        self._check_data_window(hdr.datao, hdr.datal, read.received, read.scatter.total, hdr_bytes)
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
            self._complete_by_success(cccid)

    def _complete_by_success(self, cccid: int) -> None:
        """The last C2HData carried SUCCESS: it stands for a CapsuleResp with status 0."""
        cqe = bytearray(CQE_SIZE)
        cqe[12:14] = cccid.to_bytes(2, "little")
        self.forget(cccid)
        self.success_completions += 1
        self._events.append(ResponseReceived(memoryview(cqe)))


class ControllerConnection(PduConnection):
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
        self._cur_icd: bytearray | memoryview = bytearray()
        self._cur_pull: _Pull | None = None
        self.allocate_in_capsule: InCapsuleAllocator | None = None

    @classmethod
    def resumed(
        cls,
        params: ConnectionParams,
        *,
        max_in_capsule_data: int = 8192,
        max_c2h_data: int = 131072,
        receive_buffer_size: int = 65536,
    ) -> ControllerConnection:
        """A connection whose ICReq/ICResp exchange was done elsewhere (a process that accepted
        the socket, answered the ICReq and handed the socket over): READY, with ``params``."""
        conn = cls(
            maxh2cdata=params.maxh2cdata,
            cpda=params.cpda,
            max_in_capsule_data=max_in_capsule_data,
            max_c2h_data=max_c2h_data,
            receive_buffer_size=receive_buffer_size,
            allow_digests=params.header_digest or params.data_digest,
        )
        conn.params = params
        conn._state = _S.READY
        conn._set_fast_prefix()
        return conn

    # -- API -------------------------------------------------------------------------------------
    def set_max_in_capsule_data(self, n: int) -> None:
        """Admin queue 8192; I/O queues IOCCSZ*16-64, settable after Connect."""
        if n < 0:
            raise ValueError("max in-capsule data must be >= 0")
        self._max_icd = n

    def request_data(self, cid: int, into: memoryview) -> None:
        """Queue one R2T for ``len(into)`` bytes; the H2CData lands directly in ``into``."""
        self._ready_params()
        view = byte_view(into)
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
        if len(data) == 1:  # the usual case: one buffer, no Scatter for it
            view = byte_view(data[0])
            total = len(view)
            slices = None
        else:
            scatter = Scatter(data)
            total = scatter.total
            slices = scatter.slice
        if total == 0:
            raise ValueError("send_data needs at least one byte (C2HData DATAL > 0)")
        last_flags = _LAST_SUCCESS if success else _LAST
        offset = 0
        while offset < total:
            k = min(self._max_c2h, total - offset)
            last = offset + k == total
            header = c2h_data_header(
                cid,
                offset,
                k,
                flags=last_flags if last else 0,
                header_digest=params.header_digest,
                data_digest=params.data_digest,
                pda=params.hpda,
            )
            payload = [view[offset : offset + k]] if slices is None else slices(offset, k)
            self._queue_pdu(header, payload, params.data_digest)
            offset += k

    def send_response(self, cqe: Buffer) -> None:
        """Queue a CapsuleResp."""
        params = self._ready_params()
        view = byte_view(cqe)
        if len(view) != CQE_SIZE:
            raise ValueError(f"CQE must be {CQE_SIZE} bytes, got {len(view)}")
        self._queue_pdu(capsule_resp_header(view, header_digest=params.header_digest), (), False)

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
                self._cur_icd = self._in_capsule_buffer(self._datal)
                self._cur_pull = None
                self._expect_payload([byte_view(self._cur_icd)])
            else:
                self._events.append(CommandReceived(memoryview(self._cur_sqe), None))
        else:  # H2C_DATA
            self._on_h2c(H2CDataHeader.unpack_from(hdr), hdr_bytes)

    def _in_capsule_buffer(self, size: int) -> bytearray | memoryview:
        # Only here, where the data is still to come: a capsule already whole in the receive
        # buffer (the fast path) is small, and copying it out is as cheap as anything.
        allocate = self.allocate_in_capsule
        if allocate is None:
            return bytearray(size)
        buf = allocate(memoryview(self._cur_sqe), size)
        if len(buf) != size:
            raise ValueError(f"in-capsule allocator gave {len(buf)} bytes for {size}")
        return buf

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
        self._set_fast_prefix()
        self._events.append(ICReqReceived(self.params))

    def _set_fast_prefix(self) -> None:
        params = self.params
        assert params is not None
        if not params.header_digest and not params.data_digest and self._cpda == 0:
            # CapsuleCmd, flags 0, HLEN 72, PDO 0 (no data) or 72 (in-capsule data, CPDA 0)
            self._fast_prefix = (_CMD_CH_PREFIX,)

    def _on_fast_pdu(self, avail: int) -> bool:
        start = self._rstart
        pdo = self._rbuf[start + 3]
        (plen,) = _U32.unpack_from(self._rbuf, start + 4)
        if avail < plen:
            return False
        if pdo == 0 and plen == _CMD_HLEN:
            sqe = bytearray(self._rview[start + 8 : start + _CMD_HLEN])
            self._cur_sqe = sqe
            self._events.append(CommandReceived(memoryview(sqe), None))
        elif pdo == _CMD_HLEN and _CMD_HLEN < plen <= _CMD_HLEN + self._max_icd:
            sqe = bytearray(self._rview[start + 8 : start + _CMD_HLEN])
            icd = bytearray(self._rview[start + _CMD_HLEN : start + plen])
            self._cur_sqe, self._cur_icd, self._cur_pull = sqe, icd, None
            self._events.append(CommandReceived(memoryview(sqe), memoryview(icd)))
        else:
            return False  # PDO or PLEN out of line: the general path says how
        self._rstart = start + plen
        return True

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
        if hdr.datal > self._maxh2cdata and hdr.datal == self._datal:
            raise self._fail(
                f"H2CData DATAL {hdr.datal} > MAXH2CDATA {self._maxh2cdata}",
                _FES.DATA_TRANSFER_LIMIT_EXCEEDED,
                FEI_DATAL,
                hdr_bytes,
            )
        self._check_data_window(hdr.datao, hdr.datal, pull.received, len(pull.into), hdr_bytes)
        self._cur_pull = pull
        self._cur_sqe = bytearray()
        self._expect_payload([pull.into[hdr.datao : hdr.datao + hdr.datal]])

    def _payload_done(self, digest_ok: bool) -> None:
        pull = self._cur_pull
        if pull is None:  # in-capsule data
            cid = int.from_bytes(self._cur_sqe[2:4], "little")
            if digest_ok:
                # The allocator's own view, not a new one over it: its identity says whose it is.
                icd = self._cur_icd
                data = icd if isinstance(icd, memoryview) else memoryview(icd)
                event: Event = CommandReceived(memoryview(self._cur_sqe), data)
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
