"""The one exception hierarchy of GPUCache.

Two kinds of protocol error, as in SPDK and h2: connection-fatal ``PduError`` (the termination PDU's
fatal error status and field offset) and per-command ``CommandError`` (an NVMe status that becomes a
CQE). API callers see ``NvmeError`` (a command completed with an error status), ``ConnectionLost``
and ``CommandTimeout``.
"""

from __future__ import annotations

from nvmeof.spec.status import Status


class NvmeofError(Exception):
    """Base of every error GPUCache raises."""


class ProtocolError(NvmeofError):
    """The peer broke the protocol (or we were asked to)."""


class PduError(ProtocolError):
    """Connection-fatal NVMe/TCP error; a termination PDU carrying ``fes``/``fei`` is queued."""

    def __init__(self, message: str, *, fes: int, fei: int = 0) -> None:
        super().__init__(f"{message} (fes=0x{fes:02x}, fei={fei})")
        self.fes = fes
        self.fei = fei


class TerminatedByPeer(ProtocolError):
    """The peer sent a termination PDU."""

    def __init__(self, fes: int, fei: int) -> None:
        super().__init__(f"peer terminated the connection (fes=0x{fes:02x}, fei={fei})")
        self.fes = fes
        self.fei = fei


class CommandError(NvmeofError):
    """Raised inside the target while executing a command; becomes the CQE status."""

    def __init__(self, status: Status, message: str = "", *, dw0: int = 0) -> None:
        super().__init__(message or str(status))
        self.status = status
        self.dw0 = dw0


class NvmeError(NvmeofError):
    """A command completed with an error status."""

    def __init__(self, status: Status, message: str = "") -> None:
        super().__init__(f"{message}: {status}" if message else str(status))
        self.status = status


class KeyNotFound(NvmeError, KeyError):
    """The KV key does not exist on the target."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "key not found"


class KeyExists(NvmeError):
    """A Store that must not overwrite found the key present."""


class ConnectionLost(NvmeofError):
    """The transport connection is gone; every waiter on it gets this."""


class CommandTimeout(NvmeofError, TimeoutError):
    """A command did not complete in time."""


class AuthenticationFailed(NvmeofError):
    """In-band authentication (DH-HMAC-CHAP) failed; ``explanation`` is the Failure1/Failure2
    reason code explanation when one was exchanged (1 failed, 4 hash unusable, ...)."""

    def __init__(self, message: str, explanation: int | None = None) -> None:
        super().__init__(message)
        self.explanation = explanation
