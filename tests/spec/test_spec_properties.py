"""CAP, CC and CSTS bit layouts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmeof.spec.properties import (
    CSS_IO_COMMAND_SETS,
    CSS_NO_IO,
    CSS_NVM,
    IOCQES,
    IOSQES,
    VERSION_2_0,
    CommandSetSelection,
    ControllerCapabilities,
    ControllerConfiguration,
    ControllerStatus,
    PropertyOffset,
    ShutdownNotification,
    ShutdownStatus,
    version,
)


def test_offsets_and_version() -> None:
    assert [int(p) for p in PropertyOffset] == [0x00, 0x08, 0x14, 0x1C, 0x20, 0x68]
    assert VERSION_2_0 == version(2, 0) == 0x00020000
    assert version(1, 4) == 0x00010400


def test_cap_golden_bits() -> None:
    cap = ControllerCapabilities(
        mqes=127, cqr=True, to=15, css=CSS_NVM | CSS_IO_COMMAND_SETS, mpsmin=0, mpsmax=0
    )
    value = cap.to_int()
    assert value & 0xFFFF == 127
    assert value >> 16 & 1 == 1
    assert value >> 24 & 0xFF == 15
    assert value >> 37 & 1 == 1  # NVM
    assert value >> 43 & 1 == 1  # I/O command sets
    assert value >> 44 & 1 == 0
    assert cap.io_command_sets_supported
    assert ControllerCapabilities.from_int(value) == cap
    assert ControllerCapabilities(css=CSS_NO_IO).to_int() >> 44 & 1 == 1


def test_cc_as_linux_writes_it() -> None:
    cc = ControllerConfiguration(
        en=True, css=CommandSetSelection.ALL_IO, iosqes=IOSQES, iocqes=IOCQES
    )
    assert cc.to_int() == 0x00460061
    assert ControllerConfiguration.from_int(0x00460061) == cc
    shutdown = ControllerConfiguration.from_int(0x00464061)
    assert shutdown.shn == ShutdownNotification.NORMAL


def test_csts_bits() -> None:
    assert ControllerStatus(rdy=True).to_int() == 1
    assert ControllerStatus(shst=ShutdownStatus.COMPLETE).to_int() == 0x8
    assert ControllerStatus.from_int(0x3) == ControllerStatus(rdy=True, cfs=True)


@given(
    st.integers(0, 0xFFFF),
    st.booleans(),
    st.integers(0, 3),
    st.integers(0, 255),
    st.integers(0, 15),
    st.booleans(),
    st.integers(0, 255),
    st.integers(0, 15),
    st.integers(0, 15),
)
def test_cap_round_trip(
    mqes: int, cqr: bool, ams: int, to: int, dstrd: int, nssrs: bool, css: int, lo: int, hi: int
) -> None:
    cap = ControllerCapabilities(mqes, cqr, ams, to, dstrd, nssrs, css, lo, hi)
    assert ControllerCapabilities.from_int(cap.to_int()) == cap


@given(st.integers(0, 2**32 - 1))
def test_cc_from_int_to_int_keeps_known_bits(value: int) -> None:
    known = 0x1 | 0x7 << 4 | 0xF << 7 | 0x7 << 11 | 0x3 << 14 | 0xF << 16 | 0xF << 20
    assert ControllerConfiguration.from_int(value).to_int() == value & known


@given(st.integers(0, 2**32 - 1))
def test_csts_from_int_to_int_keeps_known_bits(value: int) -> None:
    assert ControllerStatus.from_int(value).to_int() == value & 0x3F


def test_out_of_range_field_rejected() -> None:
    with pytest.raises(ValueError, match="fit"):
        ControllerConfiguration(css=8).to_int()
