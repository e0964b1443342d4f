"""The small verbs interface the NVMe/RDMA channels run on.

Two backends implement it: real RDMA through pyverbs (``nvmeof.transport.pyverbs_backend``,
imported only when asked for) and the simulator's verbs layer (``simulator.rdma``, which adapts
``simulator.verbs`` from the simulator's side, so ``nvmeof`` never imports the simulator).

It is deliberately smaller than verbs: one RC queue pair per endpoint with one completion queue
for both directions, memory regions over caller memory, the four work requests NVMe/RDMA needs
(SEND with optional invalidate, RECV, RDMA WRITE, RDMA READ), and connection setup the way
RDMA-CM does it (a connect request carrying private data, answered by accept or reject).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import attrs

from nvmeof.errors import ConnectionLost, NvmeofError


class Access(enum.IntFlag):
    """``ibv_access_flags`` values."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4


class WcStatus(enum.IntEnum):
    """``ibv_wc_status`` values the channels tell apart."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    GENERAL_ERR = 21


def status_name(status: int) -> str:
    try:
        return WcStatus(status).name
    except ValueError:
        return f"status {status}"


class WcKind(enum.Enum):
    SEND = "send"
    RDMA_WRITE = "rdma_write"
    RDMA_READ = "rdma_read"
    RECV = "recv"


@attrs.frozen
class WorkCompletion:
    wr_id: int
    status: int
    kind: WcKind
    byte_len: int = 0
    invalidated_rkey: int | None = None  # a RECV of a Send with Invalidate


class RegistrationError(NvmeofError):
    """A buffer this backend cannot register (read-only memory, device memory, no device)."""


class RdmaUnavailable(NvmeofError):
    """pyverbs or an RDMA device is missing; the message says how to get them."""


class ConnectionRejected(ConnectionLost):
    """The controller refused the connection; ``private_data`` is its reject data (maybe empty)."""

    def __init__(self, message: str, private_data: bytes = b"") -> None:
        super().__init__(message)
        self.private_data = private_data


class MemoryRegion(Protocol):
    """Registered memory: ``addr`` is what a peer names in a keyed SGL (with ``rkey``)."""

    @property
    def addr(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def lkey(self) -> int: ...

    @property
    def rkey(self) -> int: ...

    def close(self) -> None: ...


@attrs.frozen
class Sge:
    """``length`` bytes at ``offset`` into a registered region."""

    mr: MemoryRegion
    offset: int
    length: int


class Endpoint(Protocol):
    """One connected RC queue pair and its completion queue."""

    peer: str
    remote_invalidate: bool  # can post Send with Invalidate and report invalidated keys
    max_sge: int

    def register(self, buffer: memoryview, access: Access) -> MemoryRegion:
        """Register ``buffer`` in place (raises ``RegistrationError`` where it cannot)."""

    def post_recv(self, wr_id: int, sge: Sge) -> None: ...

    def post_send(
        self, wr_id: int, sges: Sequence[Sge], *, invalidate_rkey: int | None = None
    ) -> None: ...

    def post_write(self, wr_id: int, sges: Sequence[Sge], remote_addr: int, rkey: int) -> None: ...

    def post_read(self, wr_id: int, sges: Sequence[Sge], remote_addr: int, rkey: int) -> None: ...

    def poll(self) -> list[WorkCompletion]:
        """The completions there now (never waits)."""

    async def wait(self) -> list[WorkCompletion]:
        """At least one completion; sleeps on the completion channel (or polls, if configured)."""

    async def aclose(self) -> None:
        """Disconnect: the QP goes to the error state, posted work flushes, the peer is told."""


class RdmaConnector(Protocol):
    """The host side of RDMA-CM: resolve, create the QP, connect with private data."""

    async def __call__(
        self,
        host: str,
        port: int,
        private_data: bytes,
        *,
        send_depth: int,
        recv_depth: int,
    ) -> tuple[Endpoint, bytes]:
        """The connected endpoint and the controller's accept private data (maybe empty).
        Raises ``ConnectionRejected`` (with the reject private data) or ``ConnectionLost``."""


class ConnectRequest(Protocol):
    """One incoming connect request on a listener."""

    peer: str
    private_data: bytes

    def create_endpoint(self, *, send_depth: int, recv_depth: int) -> Endpoint:
        """The QP for this connection, ready for receives to be posted before ``accept``."""

    async def accept(self, private_data: bytes) -> None: ...

    async def reject(self, private_data: bytes) -> None: ...


class RdmaListener(Protocol):
    host: str
    port: int

    async def next_request(self) -> ConnectRequest: ...

    async def aclose(self) -> None: ...
