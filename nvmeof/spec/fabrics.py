"""Fabrics commands (opcode 0x7F): Connect, Property Get/Set, Disconnect, and the Connect data."""

from __future__ import annotations

import enum
import struct

import attrs

from nvmeof.spec.command import PSDT_SGL, AdminOpcode, Command
from nvmeof.spec.sgl import SglDescriptor, SglIdentifier


class FabricsCommandType(enum.IntEnum):
    PROPERTY_SET = 0x00
    CONNECT = 0x01
    PROPERTY_GET = 0x04
    AUTHENTICATION_SEND = 0x05
    AUTHENTICATION_RECEIVE = 0x06
    DISCONNECT = 0x08


CONNECT_DATA_SIZE = 1024
DYNAMIC_CNTLID = 0xFFFF
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"

NQN_FIELD_SIZE = 256
HOSTID_SIZE = 16
CONNECT_DATA_CNTLID_OFFSET = 16
CONNECT_DATA_SUBNQN_OFFSET = 256
CONNECT_DATA_HOSTNQN_OFFSET = 512

CATTR_SQ_FLOW_CONTROL_DISABLED = 1 << 2

# Connect response DW0 bits 31:16 (AUTHREQ): authentication / secure channel required.
CONNECT_AUTHREQ_ATR = 1 << 17
CONNECT_AUTHREQ_ASCR = 1 << 18

# Connect data always travels in the capsule (TCP); RDMA admin queues pass a keyed SGL instead.
CONNECT_DATA_IN_CAPSULE = SglDescriptor(
    length=CONNECT_DATA_SIZE, identifier=SglIdentifier.DATA_BLOCK_OFFSET
)

# Byte 1 is reserved for opcode 0x7F in the spec, but Linux nvmet (nvmet_req_init) fails every
# command whose PSDT is not 01b (SGL) with Invalid Field, Connect included; Linux hosts send 0x40.
_FABRICS_FLAGS = PSDT_SGL


class ConnectDataError(ValueError):
    """Bad Connect data; ``offset`` is the byte offset of the bad field, for the IPO in DW0."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def _encode_nqn(nqn: str, name: str) -> bytes:
    raw = nqn.encode("utf-8")
    if len(raw) >= NQN_FIELD_SIZE:
        raise ValueError(f"{name} is {len(raw)} bytes; at most {NQN_FIELD_SIZE - 1} fit")
    return raw


def _decode_nqn(buf: bytes, offset: int, name: str) -> str:
    field = buf[offset : offset + NQN_FIELD_SIZE]
    end = field.find(b"\0")
    if end < 0:
        raise ConnectDataError(f"{name} is not NUL-terminated", offset)
    if end == 0:
        raise ConnectDataError(f"{name} is empty", offset)
    try:
        return field[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConnectDataError(f"{name} is not UTF-8", offset) from exc


@attrs.frozen
class ConnectData:
    """The 1024 data bytes of a Connect command (host identity and the subsystem asked for)."""

    hostid: bytes
    cntlid: int
    subnqn: str
    hostnqn: str

    def pack(self) -> bytes:
        if len(self.hostid) != HOSTID_SIZE:
            raise ValueError(f"hostid must be {HOSTID_SIZE} bytes, not {len(self.hostid)}")
        buf = bytearray(CONNECT_DATA_SIZE)
        buf[0:HOSTID_SIZE] = self.hostid
        struct.pack_into("<H", buf, CONNECT_DATA_CNTLID_OFFSET, self.cntlid)
        subnqn = _encode_nqn(self.subnqn, "subnqn")
        hostnqn = _encode_nqn(self.hostnqn, "hostnqn")
        buf[CONNECT_DATA_SUBNQN_OFFSET : CONNECT_DATA_SUBNQN_OFFSET + len(subnqn)] = subnqn
        buf[CONNECT_DATA_HOSTNQN_OFFSET : CONNECT_DATA_HOSTNQN_OFFSET + len(hostnqn)] = hostnqn
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> ConnectData:
        data = bytes(buf[:CONNECT_DATA_SIZE])
        if len(data) < CONNECT_DATA_SIZE:
            raise ConnectDataError(f"connect data is {len(data)} bytes, not 1024", 0)
        (cntlid,) = struct.unpack_from("<H", data, CONNECT_DATA_CNTLID_OFFSET)
        return cls(
            hostid=data[0:HOSTID_SIZE],
            cntlid=cntlid,
            subnqn=_decode_nqn(data, CONNECT_DATA_SUBNQN_OFFSET, "subnqn"),
            hostnqn=_decode_nqn(data, CONNECT_DATA_HOSTNQN_OFFSET, "hostnqn"),
        )


@attrs.frozen
class ConnectParameters:
    """The SQE fields of a Connect command (bytes 40..51)."""

    recfmt: int
    qid: int
    sqsize: int  # 0's based, as on the wire
    cattr: int
    kato_ms: int

    @classmethod
    def from_command(cls, cmd: Command) -> ConnectParameters:
        return cls(
            recfmt=cmd.cdw10 & 0xFFFF,
            qid=cmd.cdw10 >> 16,
            sqsize=cmd.cdw11 & 0xFFFF,
            cattr=(cmd.cdw11 >> 16) & 0xFF,
            kato_ms=cmd.cdw12,
        )

    @property
    def sq_flow_control_disabled(self) -> bool:
        return bool(self.cattr & CATTR_SQ_FLOW_CONTROL_DISABLED)


def connect_invalid_parameter_dw0(offset: int, *, in_data: bool) -> int:
    """DW0 of a 0x82 Connect Invalid Parameters reply: IPO bits 15:0, IATTR bit 16."""
    return (offset & 0xFFFF) | (1 << 16 if in_data else 0)


def _fabrics(fctype: FabricsCommandType, cid: int, dptr: SglDescriptor, **cdws: int) -> Command:
    return Command(
        opcode=AdminOpcode.FABRICS,
        cid=cid,
        nsid=int(fctype),
        flags=_FABRICS_FLAGS,
        dptr=dptr,
        **cdws,
    )


def connect_command(
    *,
    qid: int,
    sqsize: int,
    kato_ms: int = 0,
    cattr: int = 0,
    cid: int = 0,
    dptr: SglDescriptor = CONNECT_DATA_IN_CAPSULE,
) -> Command:
    """A Connect SQE; the 1024 data bytes (``ConnectData.pack()``) go in the capsule by default."""
    return _fabrics(
        FabricsCommandType.CONNECT,
        cid,
        dptr,
        cdw10=(qid & 0xFFFF) << 16,  # RECFMT 0
        cdw11=(sqsize & 0xFFFF) | (cattr & 0xFF) << 16,
        cdw12=kato_ms & 0xFFFFFFFF,
    )


def _attrib(size: int) -> int:
    if size == 4:
        return 0
    if size == 8:
        return 1
    raise ValueError(f"property size must be 4 or 8, not {size}")


def property_get_command(offset: int, *, size: int = 4, cid: int = 0) -> Command:
    return _fabrics(
        FabricsCommandType.PROPERTY_GET, cid, SglDescriptor(), cdw10=_attrib(size), cdw11=offset
    )


def property_set_command(offset: int, value: int, *, size: int = 4, cid: int = 0) -> Command:
    attrib = _attrib(size)
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"value 0x{value:x} does not fit a {size}-byte property")
    return _fabrics(
        FabricsCommandType.PROPERTY_SET,
        cid,
        SglDescriptor(),
        cdw10=attrib,
        cdw11=offset,
        cdw12=value & 0xFFFFFFFF,
        cdw13=value >> 32,
    )


def disconnect_command(*, cid: int = 0) -> Command:
    return _fabrics(FabricsCommandType.DISCONNECT, cid, SglDescriptor())


@attrs.frozen
class PropertyAccess:
    """A Property Get or Set: which register, how wide, and (for Set) the value."""

    offset: int
    size: int  # 4 or 8
    value: int

    @classmethod
    def from_command(cls, cmd: Command) -> PropertyAccess:
        attrib = cmd.cdw10 & 0x7
        if attrib not in (0, 1):
            raise ValueError(f"property ATTRIB {attrib} is reserved")
        size = 8 if attrib else 4
        value = cmd.cdw12 | cmd.cdw13 << 32 if size == 8 else cmd.cdw12
        return cls(offset=cmd.cdw11, size=size, value=value)
