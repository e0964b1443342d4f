"""The discovery log page (Get Log Page 0x70): its 1024-byte header and 1024-byte entries.

Layout from REFERENCE.md 8.1 (Linux ``nvmf_disc_rsp_page_hdr`` / ``nvmf_disc_rsp_page_entry``,
SPDK ``spdk_nvmf_discovery_log_page``). Entries follow the header at offset 1024.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable

import attrs

DISCOVERY_LOG_HEADER_SIZE = 1024
DISCOVERY_LOG_ENTRY_SIZE = 1024
# What hosts read first: GENCTR, NUMREC, RECFMT, DLPF, reserved (libnvme reads 20 bytes, SPDK 1024).
DISCOVERY_LOG_HEADER_PREFIX = 20

_TRSVCID_SIZE = 32
_ADDRESS_FIELD_SIZE = 256
_TSAS_SIZE = 256
_TRSVCID_OFFSET = 32
_SUBNQN_OFFSET = 256
_TRADDR_OFFSET = 512
_TSAS_OFFSET = 768

ADMIN_QUEUE_SIZE = 32  # ASQSZ: the admin SQ size hosts may ask for (Linux nvmet reports 32)
DYNAMIC_CONTROLLER = 0xFFFF


class TransportType(enum.IntEnum):
    RDMA = 1
    FC = 2
    TCP = 3
    LOOP = 254


class AddressFamily(enum.IntEnum):
    IPV4 = 1
    IPV6 = 2
    IB = 3
    FC = 4
    LOOP = 254


class SubsystemType(enum.IntEnum):
    REFERRAL = 1  # another discovery service
    NVM = 2
    CURRENT_DISCOVERY = 3  # the discovery subsystem answering (Linux nvmet, SPDK report it too)


class SecureChannel(enum.IntEnum):
    """TREQ bits 1:0."""

    NOT_SPECIFIED = 0
    REQUIRED = 1
    NOT_REQUIRED = 2


TREQ_SQ_FLOW_CONTROL_DISABLE = 1 << 2  # the port accepts Connect with SQ flow control disabled


class EntryFlags(enum.IntFlag):
    """EFLAGS."""

    NONE = 0
    DUPLICATE_RETURNED_INFO = 1 << 0
    EXPLICIT_PERSISTENT_CONNECTION = 1 << 1
    NO_CDC_CONNECTIVITY = 1 << 2


class TcpSecurityType(enum.IntEnum):
    """TSAS byte 0 for TCP (SECTYPE)."""

    NONE = 0
    TLS12 = 1
    TLS13 = 2


class DiscoveryLogError(ValueError):
    pass


def _encode_text(text: str, size: int, name: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) >= size:
        raise DiscoveryLogError(f"{name} is {len(raw)} bytes; at most {size - 1} fit")
    return raw


def _decode_text(field: bytes) -> str:
    """Hosts trim both NUL padding (Linux) and space padding (SPDK's TRSVCID)."""
    end = field.find(b"\0")
    if end >= 0:
        field = field[:end]
    return field.decode("utf-8", errors="replace").rstrip(" ")


@attrs.frozen
class DiscoveryLogHeader:
    genctr: int
    numrec: int
    recfmt: int = 0

    def pack(self) -> bytes:
        buf = bytearray(DISCOVERY_LOG_HEADER_SIZE)
        struct.pack_into("<QQH", buf, 0, self.genctr, self.numrec, self.recfmt)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> DiscoveryLogHeader:
        if len(buf) < DISCOVERY_LOG_HEADER_PREFIX:
            raise DiscoveryLogError(f"discovery log header is {len(buf)} bytes, expected >= 20")
        genctr, numrec, recfmt = struct.unpack_from("<QQH", buf, 0)
        return cls(genctr=genctr, numrec=numrec, recfmt=recfmt)


def tcp_tsas(sectype: int = TcpSecurityType.NONE) -> bytes:
    return bytes([sectype]) + bytes(_TSAS_SIZE - 1)


@attrs.frozen
class DiscoveryEntry:
    """One discovery log entry: where and how a subsystem (or discovery service) is reached."""

    subnqn: str
    traddr: str
    trsvcid: str
    trtype: int = TransportType.TCP
    adrfam: int = AddressFamily.IPV4
    subtype: int = SubsystemType.NVM
    treq: int = SecureChannel.NOT_SPECIFIED
    portid: int = 0
    cntlid: int = DYNAMIC_CONTROLLER
    asqsz: int = ADMIN_QUEUE_SIZE
    eflags: int = EntryFlags.NONE
    tsas: bytes = attrs.field(default=bytes(_TSAS_SIZE))

    @tsas.validator
    def _check_tsas(self, _attribute: object, value: bytes) -> None:
        if len(value) != _TSAS_SIZE:
            raise DiscoveryLogError(f"TSAS must be {_TSAS_SIZE} bytes, not {len(value)}")

    def pack(self) -> bytes:
        buf = bytearray(DISCOVERY_LOG_ENTRY_SIZE)
        self.pack_into(buf, 0)
        return bytes(buf)

    def pack_into(self, buf: bytearray | memoryview, offset: int) -> None:
        struct.pack_into(
            "<BBBBHHHH",
            buf,
            offset,
            self.trtype,
            self.adrfam,
            self.subtype,
            self.treq,
            self.portid,
            self.cntlid,
            self.asqsz,
            self.eflags,
        )
        fields = (
            (_TRSVCID_OFFSET, _encode_text(self.trsvcid, _TRSVCID_SIZE, "TRSVCID")),
            (_SUBNQN_OFFSET, _encode_text(self.subnqn, _ADDRESS_FIELD_SIZE, "SUBNQN")),
            (_TRADDR_OFFSET, _encode_text(self.traddr, _ADDRESS_FIELD_SIZE, "TRADDR")),
            (_TSAS_OFFSET, self.tsas),
        )
        for field_offset, raw in fields:
            start = offset + field_offset
            buf[start : start + len(raw)] = raw

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> DiscoveryEntry:
        raw = bytes(buf[offset : offset + DISCOVERY_LOG_ENTRY_SIZE])
        if len(raw) < DISCOVERY_LOG_ENTRY_SIZE:
            raise DiscoveryLogError(f"discovery log entry is {len(raw)} bytes, expected 1024")
        trtype, adrfam, subtype, treq, portid, cntlid, asqsz, eflags = struct.unpack_from(
            "<BBBBHHHH", raw, 0
        )
        return cls(
            trtype=trtype,
            adrfam=adrfam,
            subtype=subtype,
            treq=treq,
            portid=portid,
            cntlid=cntlid,
            asqsz=asqsz,
            eflags=eflags,
            trsvcid=_decode_text(raw[_TRSVCID_OFFSET : _TRSVCID_OFFSET + _TRSVCID_SIZE]),
            subnqn=_decode_text(raw[_SUBNQN_OFFSET : _SUBNQN_OFFSET + _ADDRESS_FIELD_SIZE]),
            traddr=_decode_text(raw[_TRADDR_OFFSET : _TRADDR_OFFSET + _ADDRESS_FIELD_SIZE]),
            tsas=raw[_TSAS_OFFSET : _TSAS_OFFSET + _TSAS_SIZE],
        )


def pack_discovery_log(genctr: int, entries: Iterable[DiscoveryEntry]) -> bytes:
    """The whole log page: header, then one 1024-byte record per entry."""
    records = list(entries)
    buf = bytearray(DISCOVERY_LOG_HEADER_SIZE + DISCOVERY_LOG_ENTRY_SIZE * len(records))
    buf[:DISCOVERY_LOG_HEADER_SIZE] = DiscoveryLogHeader(genctr, len(records)).pack()
    for i, entry in enumerate(records):
        entry.pack_into(buf, DISCOVERY_LOG_HEADER_SIZE + i * DISCOVERY_LOG_ENTRY_SIZE)
    return bytes(buf)


def unpack_discovery_log(
    buf: bytes | bytearray | memoryview,
) -> tuple[DiscoveryLogHeader, list[DiscoveryEntry]]:
    header = DiscoveryLogHeader.unpack(buf)
    needed = DISCOVERY_LOG_HEADER_SIZE + header.numrec * DISCOVERY_LOG_ENTRY_SIZE
    if len(buf) < needed:
        raise DiscoveryLogError(
            f"discovery log of {header.numrec} records needs {needed} bytes, got {len(buf)}"
        )
    entries = [
        DiscoveryEntry.unpack(buf, DISCOVERY_LOG_HEADER_SIZE + i * DISCOVERY_LOG_ENTRY_SIZE)
        for i in range(header.numrec)
    ]
    return header, entries


def entries_offset(index: int) -> int:
    """Byte offset of entry ``index`` in the log page."""
    return DISCOVERY_LOG_HEADER_SIZE + index * DISCOVERY_LOG_ENTRY_SIZE
