"""Get/Set Features (admin 0x0A/0x09) and Get Log Page (admin 0x02): commands and parameters."""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import TypeVar

import attrs

from nvmeof.spec.command import AdminOpcode, Command
from nvmeof.spec.sgl import SglDescriptor


class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    ASYNC_EVENT_CONFIGURATION = 0x0B
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F
    IO_COMMAND_SET_PROFILE = 0x19
    KEY_VALUE_CONFIGURATION = 0x20


class FeatureSelect(enum.IntEnum):
    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


_SAVE = 1 << 31


def get_features_command(
    fid: int, *, select: int = 0, cdw11: int = 0, nsid: int = 0, cid: int = 0
) -> Command:
    return Command(
        opcode=AdminOpcode.GET_FEATURES,
        cid=cid,
        nsid=nsid,
        cdw10=(fid & 0xFF) | (select & 0x7) << 8,
        cdw11=cdw11,
    )


def set_features_command(
    fid: int, cdw11: int, *, save: bool = False, nsid: int = 0, cid: int = 0
) -> Command:
    return Command(
        opcode=AdminOpcode.SET_FEATURES,
        cid=cid,
        nsid=nsid,
        cdw10=(fid & 0xFF) | (_SAVE if save else 0),
        cdw11=cdw11,
    )


@attrs.frozen
class FeatureParameters:
    """Get or Set Features fields; ``select`` is meaningful for Get, ``save`` for Set."""

    fid: int
    select: int
    save: bool
    cdw11: int
    nsid: int

    @classmethod
    def from_command(cls, cmd: Command) -> FeatureParameters:
        return cls(
            fid=cmd.cdw10 & 0xFF,
            select=(cmd.cdw10 >> 8) & 0x7,
            save=bool(cmd.cdw10 & _SAVE),
            cdw11=cmd.cdw11,
            nsid=cmd.nsid,
        )


def encode_number_of_queues(nsqr: int, ncqr: int) -> int:
    """Number of Queues value (both 0's based): NSQ bits 15:0, NCQ bits 31:16."""
    return (nsqr & 0xFFFF) | (ncqr & 0xFFFF) << 16


def decode_number_of_queues(value: int) -> tuple[int, int]:
    return value & 0xFFFF, (value >> 16) & 0xFFFF


class LogPageId(enum.IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04
    COMMANDS_SUPPORTED_AND_EFFECTS = 0x05
    DISCOVERY = 0x70


_RAE = 1 << 15


def get_log_page_command(
    lid: int,
    length: int,
    *,
    offset: int = 0,
    csi: int = 0,
    lsp: int = 0,
    rae: bool = False,
    nsid: int = 0,
    cid: int = 0,
) -> Command:
    """A Get Log Page for ``length`` bytes (a non-zero multiple of 4) from byte ``offset``."""
    if length <= 0 or length % 4 or length > 4 << 32:
        raise ValueError(f"log page length {length} must be a positive multiple of 4")
    numd = length // 4 - 1
    return Command(
        opcode=AdminOpcode.GET_LOG_PAGE,
        cid=cid,
        nsid=nsid,
        dptr=SglDescriptor(length=length),
        cdw10=(lid & 0xFF) | (lsp & 0x7F) << 8 | (_RAE if rae else 0) | (numd & 0xFFFF) << 16,
        cdw11=numd >> 16,
        cdw12=offset & 0xFFFFFFFF,
        cdw13=offset >> 32,
        cdw14=(csi & 0xFF) << 24,
    )


@attrs.frozen
class LogPageParameters:
    lid: int
    lsp: int
    rae: bool
    length: int  # bytes: (NUMD + 1) * 4
    offset: int
    csi: int
    nsid: int

    @classmethod
    def from_command(cls, cmd: Command) -> LogPageParameters:
        numd = (cmd.cdw10 >> 16) | (cmd.cdw11 & 0xFFFF) << 16
        return cls(
            lid=cmd.cdw10 & 0xFF,
            lsp=(cmd.cdw10 >> 8) & 0x7F,
            rae=bool(cmd.cdw10 & _RAE),
            length=(numd + 1) * 4,
            offset=cmd.cdw12 | cmd.cdw13 << 32,
            csi=cmd.cdw14 >> 24,
            nsid=cmd.nsid,
        )


class CommandEffect(enum.IntFlag):
    """Commands Supported and Effects log entry bits."""

    CSUPP = 1 << 0
    LBCC = 1 << 1
    NCC = 1 << 2
    NIC = 1 << 3
    CCC = 1 << 4


EFFECTS_LOG_SIZE = 4096
_IO_EFFECTS_OFFSET = 1024


# Key type variables so dicts keyed by AdminOpcode / KvOpcode pass (Mapping keys are invariant).
_AdminKey = TypeVar("_AdminKey", bound=int)
_IoKey = TypeVar("_IoKey", bound=int)


def pack_commands_supported_and_effects(
    admin: Mapping[_AdminKey, int], io: Mapping[_IoKey, int]
) -> bytes:
    """LID 0x05: ACS[256] u32 then IOCS[256] u32 (for the CSI the host asked about)."""
    buf = bytearray(EFFECTS_LOG_SIZE)
    entries: list[tuple[int, int, int]] = [(0, op, fx) for op, fx in admin.items()]
    entries += [(_IO_EFFECTS_OFFSET, op, fx) for op, fx in io.items()]
    for base, opcode, effects in entries:
        if not 0 <= opcode <= 0xFF:
            raise ValueError(f"opcode 0x{opcode:x} out of range")
        struct.pack_into("<I", buf, base + 4 * opcode, effects)
    return bytes(buf)
