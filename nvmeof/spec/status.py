"""NVMe completion status: status code types, the codes GPUCache uses, and the 16-bit CQE field.

Codes follow the NVMe base specification and the NVMe-oF specification; the KV command set's codes
live in ``kvext.spec`` (they are generic codes in the I/O-command-set range, as SPDK encodes them).
"""

from __future__ import annotations

import contextlib
import enum

import attrs


class StatusCodeType(enum.IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2
    PATH = 3
    VENDOR = 7


class GenericStatus(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_OPCODE = 0x01
    INVALID_FIELD = 0x02
    CID_CONFLICT = 0x03
    DATA_TRANSFER_ERROR = 0x04
    INTERNAL_ERROR = 0x06
    ABORT_REQUESTED = 0x07
    ABORTED_SQ_DELETION = 0x08
    INVALID_NAMESPACE_OR_FORMAT = 0x0B
    COMMAND_SEQUENCE_ERROR = 0x0C
    INVALID_SGL_LAST_SEGMENT = 0x0D
    INVALID_SGL_DESCRIPTOR_COUNT = 0x0E
    DATA_SGL_LENGTH_INVALID = 0x0F
    SGL_DESCRIPTOR_TYPE_INVALID = 0x11
    SGL_OFFSET_INVALID = 0x16
    KEEP_ALIVE_EXPIRED = 0x19
    KEEP_ALIVE_TIMEOUT_INVALID = 0x1A
    NAMESPACE_WRITE_PROTECTED = 0x20
    TRANSIENT_TRANSPORT_ERROR = 0x22
    # I/O command set specific range (still SCT 0).
    LBA_OUT_OF_RANGE = 0x80
    CAPACITY_EXCEEDED = 0x81
    NAMESPACE_NOT_READY = 0x82


class CommandSpecificStatus(enum.IntEnum):
    COMPLETION_QUEUE_INVALID = 0x00
    INVALID_QUEUE_IDENTIFIER = 0x01
    INVALID_QUEUE_SIZE = 0x02
    ABORT_COMMAND_LIMIT_EXCEEDED = 0x03
    ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED = 0x05
    INVALID_LOG_PAGE = 0x09
    FEATURE_NOT_SAVEABLE = 0x0D
    FEATURE_NOT_CHANGEABLE = 0x0E


class FabricsStatus(enum.IntEnum):
    """Command-specific (SCT 1) codes of the fabrics commands."""

    INCOMPATIBLE_FORMAT = 0x80
    CONTROLLER_BUSY = 0x81
    CONNECT_INVALID_PARAMETERS = 0x82
    CONNECT_RESTART_DISCOVERY = 0x83
    CONNECT_INVALID_HOST = 0x84
    DISCONNECT_INVALID_QUEUE_TYPE = 0x85
    AUTHENTICATION_REQUIRED = 0x91


_DNR = 1 << 15
_MORE = 1 << 14
_BY_FIELD: dict[int, Status] = {}  # at most 2**15 entries: bounded


@attrs.frozen
class Status:
    """A completion status: status code type, status code, and the retry hints."""

    sct: int = 0
    sc: int = 0
    dnr: bool = False
    more: bool = False
    crd: int = 0

    @classmethod
    def generic(cls, sc: int, *, dnr: bool = True) -> Status:
        return cls(StatusCodeType.GENERIC, sc, dnr=dnr)

    @classmethod
    def command_specific(cls, sc: int, *, dnr: bool = True) -> Status:
        return cls(StatusCodeType.COMMAND_SPECIFIC, sc, dnr=dnr)

    @property
    def success(self) -> bool:
        return self.sct == 0 and self.sc == 0

    def to_field(self) -> int:
        """The CQE status field (bits 15:1 of CQE dword 3's upper half; phase bit 0)."""
        return (
            (self.sc & 0xFF) << 1
            | (self.sct & 0x7) << 9
            | (self.crd & 0x3) << 12
            | (_MORE if self.more else 0)
            | (_DNR if self.dnr else 0)
        )

    @classmethod
    def from_field(cls, field: int) -> Status:
        # One record per distinct field (a value: frozen, shared); every completion decodes one.
        key = field & 0xFFFE  # the phase tag (bit 0) is not part of the status
        status = _BY_FIELD.get(key)
        if status is None:
            status = _BY_FIELD[key] = cls(
                sct=(field >> 9) & 0x7,
                sc=(field >> 1) & 0xFF,
                dnr=bool(field & _DNR),
                more=bool(field & _MORE),
                crd=(field >> 12) & 0x3,
            )
        return status

    def describe(self) -> str:
        table: type[enum.IntEnum] | None = None
        if self.sct == StatusCodeType.GENERIC:
            table = GenericStatus
        elif self.sct == StatusCodeType.COMMAND_SPECIFIC:
            table = FabricsStatus if self.sc >= 0x80 else CommandSpecificStatus
        name = f"0x{self.sc:02x}"
        if table is not None:
            with contextlib.suppress(ValueError):
                name = table(self.sc).name
        text = f"sct={self.sct} sc={name}"
        return text + (" dnr" if self.dnr else "")

    def __str__(self) -> str:
        return self.describe()


SUCCESS = Status()
