"""RDMA-CM private data of NVMe/RDMA (REFERENCE.md section 7): connect request, accept, reject.

All fields are little-endian. A connect request carries 32 bytes (RECFMT, QID, HRQSIZE, HSQSIZE,
CNTLID); the CM may pad what arrives (an IB CM REQ gives 56 bytes), so decoders accept longer data
and read the first 32. Accept carries 32 bytes (RECFMT, CRQSIZE), reject 4 (RECFMT, STS).
"""

from __future__ import annotations

import enum
import struct

import attrs

RECFMT = 0
CONNECT_REQUEST_SIZE = 32
ACCEPT_SIZE = 32
REJECT_SIZE = 4

_REQUEST = struct.Struct("<HHHHH22x")
_ACCEPT = struct.Struct("<HH28x")
_REJECT = struct.Struct("<HH")


class RejectStatus(enum.IntEnum):
    """STS of the reject private data (``enum nvme_rdma_cm_status``)."""

    INVALID_PRIVATE_DATA_LENGTH = 1
    INVALID_RECFMT = 2
    INVALID_QID = 3
    INVALID_HSQSIZE = 4
    INVALID_HRQSIZE = 5
    NO_RESOURCES = 6
    INVALID_IRD = 7
    INVALID_ORD = 8


class PrivateDataError(ValueError):
    """Private data that cannot be accepted; ``status`` is the reject code to answer with."""

    def __init__(self, status: RejectStatus, message: str) -> None:
        super().__init__(f"{message} ({status.name})")
        self.status = status


def _check(data: bytes | bytearray | memoryview, size: int) -> None:
    if len(data) < size:
        raise PrivateDataError(
            RejectStatus.INVALID_PRIVATE_DATA_LENGTH,
            f"private data of {len(data)} bytes, {size} needed",
        )
    (recfmt,) = struct.unpack_from("<H", data, 0)
    if recfmt != RECFMT:
        raise PrivateDataError(RejectStatus.INVALID_RECFMT, f"record format {recfmt}")


@attrs.frozen
class ConnectRequestData:
    """The host's private data: which queue, and how deep each side's queues are.

    ``hrqsize``: host receive queue entries (1's based); ``hsqsize``: host send queue size,
    0's based (the Connect command's SQSIZE); ``cntlid``: the controller of an I/O queue
    (0 or 0xFFFF on the admin queue; older hosts leave it reserved, 0).
    """

    qid: int
    hrqsize: int
    hsqsize: int
    cntlid: int = 0
    recfmt: int = RECFMT

    def pack(self) -> bytes:
        return _REQUEST.pack(self.recfmt, self.qid, self.hrqsize, self.hsqsize, self.cntlid)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ConnectRequestData:
        _check(data, CONNECT_REQUEST_SIZE)
        recfmt, qid, hrqsize, hsqsize, cntlid = _REQUEST.unpack_from(data, 0)
        return cls(qid=qid, hrqsize=hrqsize, hsqsize=hsqsize, cntlid=cntlid, recfmt=recfmt)


@attrs.frozen
class AcceptData:
    """The controller's private data: ``crqsize`` receive queue entries (capsules it can take)."""

    crqsize: int
    recfmt: int = RECFMT

    def pack(self) -> bytes:
        return _ACCEPT.pack(self.recfmt, self.crqsize)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> AcceptData:
        _check(data, ACCEPT_SIZE)
        recfmt, crqsize = _ACCEPT.unpack_from(data, 0)
        return cls(crqsize=crqsize, recfmt=recfmt)


@attrs.frozen
class RejectData:
    """Why the controller refused the connection. ``status`` stays an int: a peer may send codes
    this table does not know."""

    status: int
    recfmt: int = RECFMT

    def pack(self) -> bytes:
        return _REJECT.pack(self.recfmt, self.status)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> RejectData:
        if len(data) < REJECT_SIZE:
            raise PrivateDataError(
                RejectStatus.INVALID_PRIVATE_DATA_LENGTH, f"reject data of {len(data)} bytes"
            )
        recfmt, status = _REJECT.unpack_from(data, 0)
        return cls(status=status, recfmt=recfmt)

    def describe(self) -> str:
        try:
            return RejectStatus(self.status).name
        except ValueError:
            return f"status {self.status}"


@attrs.frozen
class QueueLimits:
    """What a controller accepts on a connect request (nvmet-rdma / SPDK rules)."""

    max_queue_entries: int
    max_io_queues: int


def check_connect_request(
    data: bytes | bytearray | memoryview, limits: QueueLimits
) -> ConnectRequestData:
    """Decode and validate a connect request; ``PrivateDataError`` carries the reject code."""
    request = ConnectRequestData.unpack(data)
    if request.qid > limits.max_io_queues:
        raise PrivateDataError(RejectStatus.INVALID_QID, f"qid {request.qid}")
    if request.hsqsize == 0 or request.hsqsize + 1 > limits.max_queue_entries:
        raise PrivateDataError(RejectStatus.INVALID_HSQSIZE, f"hsqsize {request.hsqsize}")
    if request.hrqsize == 0 or request.hrqsize > limits.max_queue_entries:
        raise PrivateDataError(RejectStatus.INVALID_HRQSIZE, f"hrqsize {request.hrqsize}")
    return request
