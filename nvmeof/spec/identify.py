"""Identify (admin 0x06): the command and the 4096-byte data structures fabrics hosts read.

Offsets follow Linux ``struct nvme_id_ctrl`` and ``struct nvme_id_ns`` (REFERENCE.md 4, 5).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from nvmeof.spec.command import AdminOpcode, Command
from nvmeof.spec.properties import VERSION_2_0
from nvmeof.spec.sgl import SglDescriptor

IDENTIFY_DATA_SIZE = 4096
MAX_NAMESPACE_LIST = IDENTIFY_DATA_SIZE // 4
IO_COMMAND_SET_VECTORS = IDENTIFY_DATA_SIZE // 8


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NAMESPACE_ID_DESCRIPTORS = 0x03
    CSI_NAMESPACE = 0x05
    CSI_CONTROLLER = 0x06
    CSI_ACTIVE_NAMESPACES = 0x07
    CSI_INDEPENDENT_NAMESPACE = 0x08
    IO_COMMAND_SET = 0x1C


class CommandSetIdentifier(enum.IntEnum):
    NVM = 0
    KEY_VALUE = 1
    ZONED = 2


class ControllerType(enum.IntEnum):
    IO = 1
    DISCOVERY = 2
    ADMIN = 3


def identify_command(
    cns: int, *, nsid: int = 0, cntid: int = 0, csi: int = 0, cid: int = 0
) -> Command:
    return Command(
        opcode=AdminOpcode.IDENTIFY,
        cid=cid,
        nsid=nsid,
        dptr=SglDescriptor(length=IDENTIFY_DATA_SIZE),
        cdw10=(cns & 0xFF) | (cntid & 0xFFFF) << 16,
        cdw11=(csi & 0xFF) << 24,
    )


@attrs.frozen
class IdentifyParameters:
    cns: int
    cntid: int
    csi: int
    nsid: int

    @classmethod
    def from_command(cls, cmd: Command) -> IdentifyParameters:
        return cls(cns=cmd.cdw10 & 0xFF, cntid=cmd.cdw10 >> 16, csi=cmd.cdw11 >> 24, nsid=cmd.nsid)


# --- field tables: (attribute, offset, struct format) -------------------------------------------

_Field = tuple[str, int, str]


def _pack_fields(buf: bytearray, record: object, fields: Sequence[_Field]) -> None:
    for name, offset, fmt in fields:
        struct.pack_into("<" + fmt, buf, offset, getattr(record, name))


def _unpack_fields(buf: bytes, fields: Sequence[_Field]) -> dict[str, Any]:
    return {name: struct.unpack_from("<" + fmt, buf, offset)[0] for name, offset, fmt in fields}


def _page(buf: bytes | bytearray | memoryview, size: int = IDENTIFY_DATA_SIZE) -> bytes:
    data = bytes(buf[:size])
    if len(data) < size:
        raise ValueError(f"identify data is {len(data)} bytes, expected {size}")
    return data


def _ascii_field(text: str, size: int, name: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > size:
        raise ValueError(f"{name} is {len(raw)} bytes; the field holds {size}")
    return raw.ljust(size, b" ")


def _strip(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").rstrip(" \0")


def _fixed(value: bytes, size: int, name: str) -> bytes:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, not {len(value)}")
    return value


_SUBNQN_OFFSET = 768
_SUBNQN_SIZE = 256

_CONTROLLER_FIELDS: tuple[_Field, ...] = (
    ("vid", 0, "H"),
    ("ssvid", 2, "H"),
    ("rab", 72, "B"),
    ("cmic", 76, "B"),
    ("mdts", 77, "B"),
    ("cntlid", 78, "H"),
    ("ver", 80, "I"),
    ("rtd3r", 84, "I"),
    ("rtd3e", 88, "I"),
    ("oaes", 92, "I"),
    ("ctratt", 96, "I"),
    ("cntrltype", 111, "B"),
    ("oacs", 256, "H"),
    ("acl", 258, "B"),
    ("aerl", 259, "B"),
    ("frmw", 260, "B"),
    ("lpa", 261, "B"),
    ("elpe", 262, "B"),
    ("npss", 263, "B"),
    ("kas", 320, "H"),
    ("sqes", 512, "B"),
    ("cqes", 513, "B"),
    ("maxcmd", 514, "H"),
    ("nn", 516, "I"),
    ("oncs", 520, "H"),
    ("fuses", 522, "H"),
    ("fna", 524, "B"),
    ("vwc", 525, "B"),
    ("awun", 526, "H"),
    ("awupf", 528, "H"),
    ("sgls", 536, "I"),
    ("mnan", 540, "I"),
    ("ioccsz", 1792, "I"),
    ("iorcsz", 1796, "I"),
    ("icdoff", 1800, "H"),
    ("fcatt", 1802, "B"),
    ("msdbd", 1803, "B"),
    ("ofcs", 1804, "H"),
    ("dctype", 1806, "B"),
)

SGLS_SUPPORTED = 1 << 0  # SGLs, byte aligned (required by the Linux TCP host)
SGLS_KEYED = 1 << 2  # keyed SGL data blocks (RDMA)
SGLS_OFFSET = 1 << 20  # SGL offsets (in-capsule data)
SGLS_TCP = SGLS_SUPPORTED | SGLS_OFFSET
SGLS_RDMA = SGLS_SUPPORTED | SGLS_KEYED | SGLS_OFFSET

LPA_COMMANDS_SUPPORTED_AND_EFFECTS = 1 << 1
LPA_EXTENDED_DATA = 1 << 2
CTRATT_HOST_ID_128 = 1 << 0
CMIC_MULTI_PORT = 1 << 0
CMIC_MULTI_CONTROLLER = 1 << 1


@attrs.frozen
class IdentifyController:
    """Identify Controller (CNS 0x01). Defaults suit a fabrics I/O controller on TCP."""

    vid: int = 0
    ssvid: int = 0
    sn: str = ""
    mn: str = "GPUCache"
    fr: str = "0.1.0"
    rab: int = 6
    ieee: int = 0
    cmic: int = CMIC_MULTI_PORT | CMIC_MULTI_CONTROLLER
    mdts: int = 5  # 2^5 * 4 KiB = 128 KiB
    cntlid: int = 0
    ver: int = VERSION_2_0
    rtd3r: int = 0
    rtd3e: int = 0
    oaes: int = 0
    ctratt: int = CTRATT_HOST_ID_128
    cntrltype: int = ControllerType.IO
    fguid: bytes = bytes(16)
    oacs: int = 0
    acl: int = 3
    aerl: int = 3
    frmw: int = 0
    lpa: int = LPA_COMMANDS_SUPPORTED_AND_EFFECTS | LPA_EXTENDED_DATA
    elpe: int = 0
    npss: int = 0
    kas: int = 10  # 100 ms units; Linux refuses 0
    sqes: int = 0x66
    cqes: int = 0x44
    maxcmd: int = 128
    nn: int = 1024
    oncs: int = 0
    fuses: int = 0
    fna: int = 0
    vwc: int = 0
    awun: int = 0
    awupf: int = 0
    sgls: int = SGLS_TCP
    mnan: int = 1024
    subnqn: str = ""
    ioccsz: int = (64 + 8192) // 16  # SQE + 8 KiB in-capsule data, in 16-byte units
    iorcsz: int = 1
    icdoff: int = 0
    fcatt: int = 0
    msdbd: int = 1
    ofcs: int = 0
    dctype: int = 0

    def pack(self) -> bytes:
        buf = bytearray(IDENTIFY_DATA_SIZE)
        _pack_fields(buf, self, _CONTROLLER_FIELDS)
        buf[4:24] = _ascii_field(self.sn, 20, "sn")
        buf[24:64] = _ascii_field(self.mn, 40, "mn")
        buf[64:72] = _ascii_field(self.fr, 8, "fr")
        buf[73:76] = self.ieee.to_bytes(3, "little")
        buf[112:128] = _fixed(self.fguid, 16, "fguid")
        subnqn = self.subnqn.encode("utf-8")
        if len(subnqn) >= _SUBNQN_SIZE:
            raise ValueError(f"subnqn is {len(subnqn)} bytes; at most 255 fit")
        buf[_SUBNQN_OFFSET : _SUBNQN_OFFSET + len(subnqn)] = subnqn
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> IdentifyController:
        data = _page(buf)
        subnqn = data[_SUBNQN_OFFSET : _SUBNQN_OFFSET + _SUBNQN_SIZE].split(b"\0", 1)[0]
        return cls(
            sn=_strip(data[4:24]),
            mn=_strip(data[24:64]),
            fr=_strip(data[64:72]),
            ieee=int.from_bytes(data[73:76], "little"),
            fguid=data[112:128],
            subnqn=subnqn.decode("utf-8", errors="replace"),
            **_unpack_fields(data, _CONTROLLER_FIELDS),
        )


@attrs.frozen
class LbaFormat:
    ms: int = 0
    lbads: int = 12  # log2 of the LBA size
    rp: int = 0


_LBAF_OFFSET = 128
MAX_LBA_FORMATS = 64

_NAMESPACE_FIELDS: tuple[_Field, ...] = (
    ("nsze", 0, "Q"),
    ("ncap", 8, "Q"),
    ("nuse", 16, "Q"),
    ("nsfeat", 24, "B"),
    ("nlbaf", 25, "B"),
    ("flbas", 26, "B"),
    ("mc", 27, "B"),
    ("dpc", 28, "B"),
    ("dps", 29, "B"),
    ("nmic", 30, "B"),
    ("rescap", 31, "B"),
    ("fpi", 32, "B"),
    ("dlfeat", 33, "B"),
    ("anagrpid", 92, "I"),
    ("nsattr", 99, "B"),
    ("nvmsetid", 100, "H"),
    ("endgid", 102, "H"),
    ("eui64", 120, "Q"),
)


@attrs.frozen
class IdentifyNamespace:
    """Identify Namespace, NVM layout (CNS 0x00).

    ``nlbaf`` is written as given (0's based); ``unpack`` returns ``nlbaf + 1`` LBA formats.
    """

    nsze: int = 0
    ncap: int = 0
    nuse: int = 0
    nsfeat: int = 0
    nlbaf: int = 0
    flbas: int = 0
    mc: int = 0
    dpc: int = 0
    dps: int = 0
    nmic: int = 0
    rescap: int = 0
    fpi: int = 0
    dlfeat: int = 0
    anagrpid: int = 0
    nsattr: int = 0
    nvmsetid: int = 0
    endgid: int = 0
    nguid: bytes = bytes(16)
    eui64: int = 0
    lbaf: tuple[LbaFormat, ...] = (LbaFormat(),)

    def pack(self) -> bytes:
        if len(self.lbaf) > MAX_LBA_FORMATS:
            raise ValueError(f"{len(self.lbaf)} LBA formats; at most {MAX_LBA_FORMATS}")
        buf = bytearray(IDENTIFY_DATA_SIZE)
        _pack_fields(buf, self, _NAMESPACE_FIELDS)
        buf[104:120] = _fixed(self.nguid, 16, "nguid")
        for i, fmt in enumerate(self.lbaf):
            struct.pack_into("<HBB", buf, _LBAF_OFFSET + 4 * i, fmt.ms, fmt.lbads, fmt.rp & 0x3)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> IdentifyNamespace:
        data = _page(buf)
        fields = _unpack_fields(data, _NAMESPACE_FIELDS)
        count = min(fields["nlbaf"] + 1, MAX_LBA_FORMATS)
        lbaf = []
        for i in range(count):
            ms, lbads, rp = struct.unpack_from("<HBB", data, _LBAF_OFFSET + 4 * i)
            lbaf.append(LbaFormat(ms=ms, lbads=lbads, rp=rp & 0x3))
        return cls(nguid=data[104:120], lbaf=tuple(lbaf), **fields)


# --- namespace lists and descriptors ------------------------------------------------------------


def pack_namespace_list(nsids: Iterable[int]) -> bytes:
    """Active namespace list (CNS 0x02/0x07): up to 1024 NSIDs, zero-terminated."""
    ids = list(nsids)
    if len(ids) > MAX_NAMESPACE_LIST:
        raise ValueError(f"{len(ids)} NSIDs; a list holds {MAX_NAMESPACE_LIST}")
    if any(not 0 < nsid <= 0xFFFFFFFF for nsid in ids):
        raise ValueError("NSIDs must be in 1..0xFFFFFFFF")
    buf = bytearray(IDENTIFY_DATA_SIZE)
    struct.pack_into(f"<{len(ids)}I", buf, 0, *ids)
    return bytes(buf)


def unpack_namespace_list(buf: bytes | bytearray | memoryview) -> list[int]:
    data = bytes(buf[:IDENTIFY_DATA_SIZE])
    out: list[int] = []
    for (nsid,) in struct.iter_unpack("<I", data[: len(data) - len(data) % 4]):
        if nsid == 0:
            break
        out.append(nsid)
    return out


class NamespaceIdType(enum.IntEnum):
    EUI64 = 1
    NGUID = 2
    UUID = 3
    CSI = 4


@attrs.frozen
class NamespaceIdDescriptor:
    nidt: int
    value: bytes

    @classmethod
    def csi(cls, csi: int) -> NamespaceIdDescriptor:
        return cls(NamespaceIdType.CSI, bytes([csi]))


_DESCRIPTOR_HEADER = 4


def pack_namespace_id_descriptors(descs: Iterable[NamespaceIdDescriptor]) -> bytes:
    """Namespace identification descriptor list (CNS 0x03), ended by zeros."""
    buf = bytearray(IDENTIFY_DATA_SIZE)
    pos = 0
    for desc in descs:
        nidl = len(desc.value)
        if not 0 < nidl <= 0xFF:
            raise ValueError(f"descriptor value length {nidl} is not in 1..255")
        end = pos + _DESCRIPTOR_HEADER + nidl
        if end > IDENTIFY_DATA_SIZE:
            raise ValueError("descriptors overflow the 4096-byte list")
        buf[pos] = desc.nidt
        buf[pos + 1] = nidl
        buf[pos + _DESCRIPTOR_HEADER : end] = desc.value
        pos = end
    return bytes(buf)


def unpack_namespace_id_descriptors(
    buf: bytes | bytearray | memoryview,
) -> list[NamespaceIdDescriptor]:
    data = bytes(buf[:IDENTIFY_DATA_SIZE])
    out: list[NamespaceIdDescriptor] = []
    pos = 0
    while pos + _DESCRIPTOR_HEADER <= len(data):
        nidt, nidl = data[pos], data[pos + 1]
        if nidl == 0:
            break
        end = pos + _DESCRIPTOR_HEADER + nidl
        if end > len(data):
            raise ValueError(f"descriptor at {pos} (length {nidl}) overruns the buffer")
        out.append(NamespaceIdDescriptor(nidt, data[pos + _DESCRIPTOR_HEADER : end]))
        pos = end
    return out


# --- CNS 0x08 and 0x1C ---------------------------------------------------------------------------

_CSI_INDEPENDENT_FIELDS: tuple[_Field, ...] = (
    ("nsfeat", 0, "B"),
    ("nmic", 1, "B"),
    ("rescap", 2, "B"),
    ("fpi", 3, "B"),
    ("anagrpid", 4, "I"),
    ("nsattr", 8, "B"),
    ("nvmsetid", 10, "H"),
    ("endgid", 12, "H"),
    ("nstat", 14, "B"),
)

NSTAT_READY = 1 << 0


@attrs.frozen
class CsiIndependentNamespace:
    """I/O-command-set-independent Identify Namespace (CNS 0x08); Linux needs NSTAT bit0."""

    nsfeat: int = 0
    nmic: int = 0
    rescap: int = 0
    fpi: int = 0
    anagrpid: int = 0
    nsattr: int = 0
    nvmsetid: int = 0
    endgid: int = 0
    nstat: int = NSTAT_READY

    def pack(self) -> bytes:
        buf = bytearray(IDENTIFY_DATA_SIZE)
        _pack_fields(buf, self, _CSI_INDEPENDENT_FIELDS)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> CsiIndependentNamespace:
        return cls(**_unpack_fields(_page(buf), _CSI_INDEPENDENT_FIELDS))


def pack_io_command_set_vectors(vectors: Sequence[int]) -> bytes:
    """I/O command set data structure (CNS 0x1C): vector i bit n = CSI n in combination i."""
    if len(vectors) > IO_COMMAND_SET_VECTORS:
        raise ValueError(f"{len(vectors)} vectors; at most {IO_COMMAND_SET_VECTORS}")
    buf = bytearray(IDENTIFY_DATA_SIZE)
    struct.pack_into(f"<{len(vectors)}Q", buf, 0, *vectors)
    return bytes(buf)


def unpack_io_command_set_vectors(buf: bytes | bytearray | memoryview) -> list[int]:
    return list(struct.unpack(f"<{IO_COMMAND_SET_VECTORS}Q", _page(buf)))
