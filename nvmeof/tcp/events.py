"""Events a sans-IO NVMe/TCP connection reports through ``next_event()``, in the past tense."""

from __future__ import annotations

import attrs


@attrs.frozen
class ConnectionParams:
    """What the ICReq/ICResp exchange settled; both sides know it afterwards."""

    header_digest: bool
    data_digest: bool
    cpda: int
    hpda: int
    maxh2cdata: int
    maxr2t: int


@attrs.frozen
class ICReqReceived:
    """Controller side: the host's ICReq arrived; the ICResp is already queued."""

    params: ConnectionParams


@attrs.frozen
class ICRespReceived:
    """Host side: the controller's ICResp arrived; commands may be sent."""

    params: ConnectionParams


@attrs.frozen(eq=False)
class CommandReceived:
    """Controller: a 64-byte SQE (own copy) and its in-capsule data (own buffer) or None."""

    sqe: memoryview
    data: memoryview | None


@attrs.frozen
class DataReceived:
    """Controller: every byte asked for by ``request_data(cccid, ...)`` has landed, digests good."""

    cccid: int


@attrs.frozen(eq=False)
class ResponseReceived:
    """Host: a 16-byte CQE (own copy), possibly synthesised from a C2HData SUCCESS flag."""

    cqe: memoryview


@attrs.frozen
class R2TReceived:
    """Host, informational: the H2CData PDUs answering this R2T are already queued."""

    cccid: int
    ttag: int
    offset: int
    length: int


@attrs.frozen
class DataDigestError:
    """A data PDU (or in-capsule data) failed its data digest; the connection continues.

    Controller: replaces ``CommandReceived`` for a capsule whose in-capsule data is corrupt, and
    replaces ``DataReceived`` at the end of a ``request_data`` transfer in which any H2CData PDU was
    corrupt (so each transfer ends in exactly one of the two). Host: emitted as soon as the C2HData
    PDU's digest fails; the command's response (CapsuleResp, or the synthesised one for SUCCESS)
    still follows, and the command should be failed with a Data Transfer Error.
    """

    cccid: int


@attrs.frozen
class TermReqReceived:
    """The peer sent a termination PDU; the connection is now CLOSED."""

    fes: int
    fei: int


@attrs.frozen
class ConnectionClosed:
    """End of stream; ``clean`` iff it came at a PDU boundary."""

    clean: bool


Event = (
    ICReqReceived
    | ICRespReceived
    | CommandReceived
    | DataReceived
    | ResponseReceived
    | R2TReceived
    | DataDigestError
    | TermReqReceived
    | ConnectionClosed
)
