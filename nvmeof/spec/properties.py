"""Controller properties (the fabrics stand-in for PCIe registers): CAP, VS, CC, CSTS."""

from __future__ import annotations

import enum

import attrs


class PropertyOffset(enum.IntEnum):
    CAP = 0x00
    VS = 0x08
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    CRTO = 0x68


VERSION_2_0 = 0x00020000

# CAP.CSS bits, relative to CAP bit 37.
CSS_NVM = 1 << 0
CSS_IO_COMMAND_SETS = 1 << 6  # CAP bit 43: the host may then write CC.CSS = 110b
CSS_NO_IO = 1 << 7

# CC.IOSQES / CC.IOCQES every host writes (log2 of 64- and 16-byte entries).
IOSQES = 6
IOCQES = 4


def version(major: int, minor: int, tertiary: int = 0) -> int:
    """A VS / Identify VER value."""
    return (major & 0xFFFF) << 16 | (minor & 0xFF) << 8 | (tertiary & 0xFF)


class CommandSetSelection(enum.IntEnum):
    """CC.CSS."""

    NVM = 0b000
    ALL_IO = 0b110
    ADMIN_ONLY = 0b111


class ShutdownNotification(enum.IntEnum):
    """CC.SHN."""

    NONE = 0
    NORMAL = 1
    ABRUPT = 2


class ShutdownStatus(enum.IntEnum):
    """CSTS.SHST."""

    NORMAL_OPERATION = 0
    OCCURRING = 1
    COMPLETE = 2


def _bits(value: int, low: int, width: int) -> int:
    return (value >> low) & ((1 << width) - 1)


def _put(field: int, low: int, width: int) -> int:
    if not 0 <= field < 1 << width:
        raise ValueError(f"0x{field:x} does not fit {width} bits")
    return field << low


@attrs.frozen
class ControllerCapabilities:
    """CAP (8 bytes). Defaults describe a fabrics controller: CQR set, TO 7.5 s, NVM set."""

    mqes: int = 127  # 0's based
    cqr: bool = True
    ams: int = 0
    to: int = 15  # 500 ms units
    dstrd: int = 0
    nssrs: bool = False
    css: int = CSS_NVM
    mpsmin: int = 0
    mpsmax: int = 0

    @property
    def io_command_sets_supported(self) -> bool:
        return bool(self.css & CSS_IO_COMMAND_SETS)

    def to_int(self) -> int:
        return (
            _put(self.mqes, 0, 16)
            | _put(int(self.cqr), 16, 1)
            | _put(self.ams, 17, 2)
            | _put(self.to, 24, 8)
            | _put(self.dstrd, 32, 4)
            | _put(int(self.nssrs), 36, 1)
            | _put(self.css, 37, 8)
            | _put(self.mpsmin, 48, 4)
            | _put(self.mpsmax, 52, 4)
        )

    @classmethod
    def from_int(cls, value: int) -> ControllerCapabilities:
        return cls(
            mqes=_bits(value, 0, 16),
            cqr=bool(_bits(value, 16, 1)),
            ams=_bits(value, 17, 2),
            to=_bits(value, 24, 8),
            dstrd=_bits(value, 32, 4),
            nssrs=bool(_bits(value, 36, 1)),
            css=_bits(value, 37, 8),
            mpsmin=_bits(value, 48, 4),
            mpsmax=_bits(value, 52, 4),
        )


@attrs.frozen
class ControllerConfiguration:
    """CC (4 bytes). The reset value is all zeros."""

    en: bool = False
    css: int = CommandSetSelection.NVM
    mps: int = 0
    ams: int = 0
    shn: int = ShutdownNotification.NONE
    iosqes: int = 0
    iocqes: int = 0

    def to_int(self) -> int:
        return (
            _put(int(self.en), 0, 1)
            | _put(self.css, 4, 3)
            | _put(self.mps, 7, 4)
            | _put(self.ams, 11, 3)
            | _put(self.shn, 14, 2)
            | _put(self.iosqes, 16, 4)
            | _put(self.iocqes, 20, 4)
        )

    @classmethod
    def from_int(cls, value: int) -> ControllerConfiguration:
        return cls(
            en=bool(_bits(value, 0, 1)),
            css=_bits(value, 4, 3),
            mps=_bits(value, 7, 4),
            ams=_bits(value, 11, 3),
            shn=_bits(value, 14, 2),
            iosqes=_bits(value, 16, 4),
            iocqes=_bits(value, 20, 4),
        )


@attrs.frozen
class ControllerStatus:
    """CSTS (4 bytes)."""

    rdy: bool = False
    cfs: bool = False
    shst: int = ShutdownStatus.NORMAL_OPERATION
    nssro: bool = False
    pp: bool = False

    def to_int(self) -> int:
        return (
            _put(int(self.rdy), 0, 1)
            | _put(int(self.cfs), 1, 1)
            | _put(self.shst, 2, 2)
            | _put(int(self.nssro), 4, 1)
            | _put(int(self.pp), 5, 1)
        )

    @classmethod
    def from_int(cls, value: int) -> ControllerStatus:
        return cls(
            rdy=bool(_bits(value, 0, 1)),
            cfs=bool(_bits(value, 1, 1)),
            shst=_bits(value, 2, 2),
            nssro=bool(_bits(value, 4, 1)),
            pp=bool(_bits(value, 5, 1)),
        )
