"""The NVMe Key-Value command set (CSI 1), encoded as SPDK v26.09 (``nvme_spec.h``, ``nvme_kv.h``).

Key bytes 0-15 ride in CDW2, CDW3, CDW14, CDW15 (little-endian dwords); CDW11 holds the key length
(bits 7:0) and the options (bits 15:8); CDW10 the value or host buffer size.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Iterable

import attrs

from nvmeof.spec.command import PSDT_SGL, Command
from nvmeof.spec.sgl import SglDescriptor
from nvmeof.spec.status import Status

KV_CSI = 1
MAX_KEY_LENGTH = 16
KV_SPEC_VERSION = 0x00010300  # 1.3.0, as SPDK's header names it
KV_IDENTIFY_SIZE = 4096
MAX_KV_FORMATS = 16


class KvOpcode(enum.IntEnum):
    FLUSH = 0x00  # shared by every I/O command set: makes acknowledged Stores durable
    STORE = 0x01
    RETRIEVE = 0x02
    LIST = 0x06
    DELETE = 0x10
    EXIST = 0x14


class KvStatus(enum.IntEnum):
    """Generic (SCT 0) codes in the I/O-command-set range, as SPDK, libnvme and xNVMe use them."""

    INVALID_VALUE_SIZE = 0x85
    INVALID_KEY_SIZE = 0x86
    KEY_DOES_NOT_EXIST = 0x87
    UNRECOVERED_ERROR = 0x88
    KEY_EXISTS = 0x89


def kv_status(code: int) -> Status:
    return Status.generic(code, dnr=True)


class StoreOption(enum.IntFlag):
    MUST_EXIST = 0x01
    MUST_NOT_EXIST = 0x02
    NO_COMPRESS = 0x04


class RetrieveOption(enum.IntFlag):
    RAW = 0x01


_KEY = struct.Struct("<4I")


def _check_key(key: bytes) -> None:
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise ValueError(f"key length {len(key)} is not in 1..{MAX_KEY_LENGTH}")


def _key_dwords(key: bytes) -> tuple[int, int, int, int]:
    cdw2, cdw3, cdw14, cdw15 = _KEY.unpack(key.ljust(MAX_KEY_LENGTH, b"\0"))
    return cdw2, cdw3, cdw14, cdw15


def pack_key(key: bytes) -> tuple[int, int, int, int]:
    """(cdw2, cdw3, cdw14, cdw15) for a 1..16-byte key, unused bytes zero."""
    _check_key(key)
    return _key_dwords(key)


@functools.lru_cache(maxsize=64)
def _transport_sgl(length: int) -> SglDescriptor:
    # A frozen value: one per buffer size serves every command of that size (a cache's values
    # come in a few sizes), instead of a new record per put and get.
    return SglDescriptor(length=length)


@attrs.frozen
class KvCommandFields:
    """The KV fields of an SQE. ``key`` is the first min(KL, 16) key bytes; KL is kept raw."""

    key: bytes
    key_length: int
    options: int
    size: int

    @classmethod
    def from_command(cls, cmd: Command) -> KvCommandFields:
        key_length = cmd.cdw11 & 0xFF
        raw = _KEY.pack(cmd.cdw2, cmd.cdw3, cmd.cdw14, cmd.cdw15)
        # Positional, in field order: every KV command on the target comes here.
        return cls(
            raw[: min(key_length, MAX_KEY_LENGTH)], key_length, (cmd.cdw11 >> 8) & 0xFF, cmd.cdw10
        )


def _kv_command(
    opcode: KvOpcode,
    nsid: int,
    key: bytes,
    size: int,
    options: int,
    cid: int,
    dptr: SglDescriptor,
) -> Command:
    if not 0 <= options <= 0xFF:
        raise ValueError(f"options 0x{options:x} do not fit 8 bits")
    if not 0 <= size <= 0xFFFFFFFF:
        raise ValueError(f"size {size} does not fit 32 bits")
    cdw2, cdw3, cdw14, cdw15 = _key_dwords(key)
    # Positional, in Command's field order (opcode, cid, nsid, flags, cdw2, cdw3, mptr, dptr,
    # cdw10..cdw15): twice as fast as keywords on a path every put and get takes.
    return Command(
        opcode, cid, nsid, PSDT_SGL, cdw2, cdw3, 0, dptr,
        size, len(key) | options << 8, 0, 0, cdw14, cdw15,
    )  # fmt: skip


def store_command(
    nsid: int,
    key: bytes,
    value_size: int,
    *,
    options: int = 0,
    cid: int = 0,
    dptr: SglDescriptor | None = None,
) -> Command:
    """Store; ``dptr`` defaults to a transport SGL of ``value_size`` bytes."""
    _check_key(key)
    sgl = _transport_sgl(value_size) if dptr is None else dptr
    return _kv_command(KvOpcode.STORE, nsid, key, value_size, options, cid, sgl)


def retrieve_command(
    nsid: int,
    key: bytes,
    buffer_size: int,
    *,
    options: int = 0,
    cid: int = 0,
    dptr: SglDescriptor | None = None,
) -> Command:
    """Retrieve into a host buffer of ``buffer_size`` bytes; the CQE's DW0 is the value size."""
    _check_key(key)
    sgl = _transport_sgl(buffer_size) if dptr is None else dptr
    return _kv_command(KvOpcode.RETRIEVE, nsid, key, buffer_size, options, cid, sgl)


def delete_command(nsid: int, key: bytes, *, cid: int = 0) -> Command:
    _check_key(key)
    return _kv_command(KvOpcode.DELETE, nsid, key, 0, 0, cid, SglDescriptor())


def exist_command(nsid: int, key: bytes, *, cid: int = 0) -> Command:
    _check_key(key)
    return _kv_command(KvOpcode.EXIST, nsid, key, 0, 0, cid, SglDescriptor())


def list_command(
    nsid: int,
    buffer_size: int,
    *,
    start_key: bytes = b"",
    cid: int = 0,
    dptr: SglDescriptor | None = None,
) -> Command:
    """List keys into a host buffer; an empty ``start_key`` (KL 0) starts anywhere."""
    if start_key:
        _check_key(start_key)
    sgl = SglDescriptor(length=buffer_size) if dptr is None else dptr
    return _kv_command(KvOpcode.LIST, nsid, start_key, buffer_size, 0, cid, sgl)


# --- Identify ------------------------------------------------------------------------------------

_FORMAT = struct.Struct("<H1xBII4x")


@attrs.frozen
class KvFormat:
    """One 16-byte KV format; both maxima 0 means valid but unavailable."""

    max_key_length: int = MAX_KEY_LENGTH
    relative_performance: int = 0
    max_value_length: int = 0
    max_num_keys: int = 0  # 0 = no limit reported

    def pack_into(self, buf: bytearray, offset: int) -> None:
        _FORMAT.pack_into(
            buf,
            offset,
            self.max_key_length,
            self.relative_performance & 0x3,
            self.max_value_length,
            self.max_num_keys,
        )

    @classmethod
    def unpack_from(cls, buf: bytes, offset: int) -> KvFormat:
        kvkml, perf, kvvml, mnks = _FORMAT.unpack_from(buf, offset)
        return cls(kvkml, perf & 0x3, kvvml, mnks)


_NS_HEAD = struct.Struct("<Q8xQBBBBB3xII3xBHH16sQ")  # bytes 0..71
_FORMATS_OFFSET = 72


def _page(buf: bytes | bytearray | memoryview) -> bytes:
    data = bytes(buf[:KV_IDENTIFY_SIZE])
    if len(data) < KV_IDENTIFY_SIZE:
        raise ValueError(f"identify data is {len(data)} bytes, expected {KV_IDENTIFY_SIZE}")
    return data


@attrs.frozen
class KvIdentifyNamespace:
    """KV Identify Namespace (CNS 0x05, CSI 1). Sizes are in bytes; NKVF is 0's based."""

    nsze: int = 0
    nuse: int = 0
    nsfeat: int = 0
    nmic: int = 0
    rescap: int = 0
    fpi: int = 0
    novg: int = 0
    anagrpid: int = 0
    nsattr: int = 0
    nvmsetid: int = 0
    endgid: int = 0
    nguid: bytes = bytes(16)
    eui64: int = 0
    formats: tuple[KvFormat, ...] = (KvFormat(),)

    def pack(self) -> bytes:
        if not 1 <= len(self.formats) <= MAX_KV_FORMATS:
            raise ValueError(f"{len(self.formats)} KV formats; need 1..{MAX_KV_FORMATS}")
        if len(self.nguid) != 16:
            raise ValueError(f"nguid must be 16 bytes, not {len(self.nguid)}")
        buf = bytearray(KV_IDENTIFY_SIZE)
        _NS_HEAD.pack_into(
            buf,
            0,
            self.nsze,
            self.nuse,
            self.nsfeat,
            len(self.formats) - 1,
            self.nmic,
            self.rescap,
            self.fpi,  # byte 29 (KVFC in SPDK's header) stays 0
            self.novg,
            self.anagrpid,
            self.nsattr,
            self.nvmsetid,
            self.endgid,
            self.nguid,
            self.eui64,
        )
        for i, fmt in enumerate(self.formats):
            fmt.pack_into(buf, _FORMATS_OFFSET + 16 * i)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> KvIdentifyNamespace:
        data = _page(buf)
        (nsze, nuse, nsfeat, nkvf, nmic, rescap, fpi, novg, anagrpid, nsattr, nvmsetid, endgid,
         nguid, eui64) = _NS_HEAD.unpack_from(data, 0)  # fmt: skip
        count = min(nkvf + 1, MAX_KV_FORMATS)
        formats = tuple(KvFormat.unpack_from(data, _FORMATS_OFFSET + 16 * i) for i in range(count))
        return cls(
            nsze=nsze,
            nuse=nuse,
            nsfeat=nsfeat,
            nmic=nmic,
            rescap=rescap,
            fpi=fpi,
            novg=novg,
            anagrpid=anagrpid,
            nsattr=nsattr,
            nvmsetid=nvmsetid,
            endgid=endgid,
            nguid=nguid,
            eui64=eui64,
            formats=formats,
        )


@attrs.frozen
class KvIdentifyController:
    """KV Identify Controller (CNS 0x06, CSI 1): only VER at byte 0; SPDK does not check it."""

    version: int = KV_SPEC_VERSION

    def pack(self) -> bytes:
        buf = bytearray(KV_IDENTIFY_SIZE)
        struct.pack_into("<I", buf, 0, self.version)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> KvIdentifyController:
        (version,) = struct.unpack_from("<I", _page(buf), 0)
        return cls(version)


# --- List data -----------------------------------------------------------------------------------

_NRK = struct.Struct("<I")
_KL = struct.Struct("<H")


def _entry_size(key_length: int) -> int:
    return (2 + key_length + 3) & ~3


def encode_key_list(keys: Iterable[bytes], buffer_size: int) -> bytes:
    """List data: NRK then {KL u16, key, pad to 4}; only complete entries that fit the buffer."""
    if buffer_size < _NRK.size:
        return bytes(max(buffer_size, 0))
    out = bytearray(_NRK.size)
    count = 0
    for key in keys:
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise ValueError(f"key length {len(key)} is not in 1..{MAX_KEY_LENGTH}")
        size = _entry_size(len(key))
        if len(out) + size > buffer_size:
            break
        entry = bytearray(size)
        _KL.pack_into(entry, 0, len(key))
        entry[2 : 2 + len(key)] = key
        out += entry
        count += 1
    _NRK.pack_into(out, 0, count)
    return bytes(out)


def decode_key_list(buf: bytes | bytearray | memoryview) -> list[bytes]:
    data = bytes(buf)
    if len(data) < _NRK.size:
        raise ValueError(f"list data is {len(data)} bytes; NRK needs 4")
    (count,) = _NRK.unpack_from(data, 0)
    keys: list[bytes] = []
    pos = _NRK.size
    for i in range(count):
        if pos + _KL.size > len(data):
            raise ValueError(f"entry {i} at {pos} overruns the {len(data)}-byte buffer")
        (key_length,) = _KL.unpack_from(data, pos)
        if not 1 <= key_length <= MAX_KEY_LENGTH:
            raise ValueError(f"entry {i} at {pos} has key length {key_length}")
        end = pos + _entry_size(key_length)
        if end > len(data):
            raise ValueError(f"entry {i} at {pos} overruns the {len(data)}-byte buffer")
        keys.append(data[pos + 2 : pos + 2 + key_length])
        pos = end
    return keys


KV_IO_COMMAND_EFFECTS: dict[int, int] = {
    KvOpcode.STORE: 0x3,  # CSUPP | LBCC
    KvOpcode.DELETE: 0x3,
    KvOpcode.RETRIEVE: 0x1,  # CSUPP
    KvOpcode.LIST: 0x1,
    KvOpcode.EXIST: 0x1,
    KvOpcode.FLUSH: 0x1,
}
