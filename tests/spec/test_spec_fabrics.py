"""Fabrics commands and Connect data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmeof.spec.command import AdminOpcode, Command
from nvmeof.spec.fabrics import (
    CONNECT_DATA_SIZE,
    DISCOVERY_NQN,
    DYNAMIC_CNTLID,
    ConnectData,
    ConnectDataError,
    ConnectParameters,
    FabricsCommandType,
    PropertyAccess,
    connect_command,
    connect_invalid_parameter_dw0,
    disconnect_command,
    property_get_command,
    property_set_command,
)
from nvmeof.spec.sgl import SglIdentifier

HOSTID = bytes(range(16))
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:00010203-0405-0607-0809-0a0b0c0d0e0f"
SUBNQN = "nqn.2016-06.io.spdk:cnode1"

nqns = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=1, max_size=100
)


def test_connect_data_layout() -> None:
    data = ConnectData(HOSTID, DYNAMIC_CNTLID, SUBNQN, HOSTNQN).pack()
    assert len(data) == CONNECT_DATA_SIZE
    assert data[0:16] == HOSTID
    assert data[16:18] == b"\xff\xff"
    assert data[256 : 256 + len(SUBNQN)] == SUBNQN.encode()
    assert data[256 + len(SUBNQN)] == 0
    assert data[512 : 512 + len(HOSTNQN)] == HOSTNQN.encode()
    assert data[768:] == bytes(256)


@given(st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFF), nqns, nqns)
def test_connect_data_round_trip(hostid: bytes, cntlid: int, subnqn: str, hostnqn: str) -> None:
    cd = ConnectData(hostid, cntlid, subnqn, hostnqn)
    assert ConnectData.unpack(cd.pack()) == cd


def test_connect_data_rejects_unterminated_subnqn() -> None:
    buf = bytearray(ConnectData(HOSTID, 1, SUBNQN, HOSTNQN).pack())
    buf[256:512] = b"a" * 256
    with pytest.raises(ConnectDataError) as info:
        ConnectData.unpack(buf)
    assert info.value.offset == 256


def test_connect_data_rejects_empty_and_bad_hostnqn() -> None:
    buf = bytearray(ConnectData(HOSTID, 1, SUBNQN, HOSTNQN).pack())
    buf[512:768] = bytes(256)
    with pytest.raises(ConnectDataError) as info:
        ConnectData.unpack(buf)
    assert info.value.offset == 512
    buf[512:515] = b"\xff\xfe\x00"
    with pytest.raises(ConnectDataError) as info:
        ConnectData.unpack(buf)
    assert info.value.offset == 512


def test_connect_data_short_buffer() -> None:
    with pytest.raises(ConnectDataError) as info:
        ConnectData.unpack(bytes(1000))
    assert info.value.offset == 0
    assert isinstance(info.value, ValueError)


def test_connect_data_pack_rejects_oversize() -> None:
    with pytest.raises(ValueError, match="subnqn"):
        ConnectData(HOSTID, 1, "n" * 256, HOSTNQN).pack()
    with pytest.raises(ValueError, match="hostid"):
        ConnectData(b"short", 1, SUBNQN, HOSTNQN).pack()


def test_connect_command_bytes() -> None:
    cmd = connect_command(qid=3, sqsize=127, kato_ms=5000, cattr=0x4, cid=9)
    raw = cmd.to_bytes()
    assert raw[0] == 0x7F
    assert raw[1] == 0x40  # PSDT = SGL: Linux nvmet refuses 0 (Invalid Field)
    assert raw[2:4] == b"\x09\x00"
    assert raw[4] == FabricsCommandType.CONNECT
    assert struct.unpack_from("<HHHBxI", raw, 40) == (0, 3, 127, 4, 5000)
    assert raw[39] == SglIdentifier.DATA_BLOCK_OFFSET
    assert struct.unpack_from("<I", raw, 32)[0] == CONNECT_DATA_SIZE
    params = ConnectParameters.from_command(Command.unpack_from(raw))
    assert params == ConnectParameters(recfmt=0, qid=3, sqsize=127, cattr=4, kato_ms=5000)
    assert params.sq_flow_control_disabled
    assert not ConnectParameters.from_command(
        connect_command(qid=0, sqsize=31)
    ).sq_flow_control_disabled


@given(
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 2**32 - 1)
)
def test_connect_parameters_round_trip(qid: int, sqsize: int, cattr: int, kato: int) -> None:
    cmd = connect_command(qid=qid, sqsize=sqsize, cattr=cattr, kato_ms=kato)
    params = ConnectParameters.from_command(Command.unpack_from(cmd.to_bytes()))
    assert (params.qid, params.sqsize, params.cattr, params.kato_ms) == (qid, sqsize, cattr, kato)


def test_property_get_bytes() -> None:
    raw = property_get_command(0x00, size=8, cid=2).to_bytes()
    assert raw[0] == AdminOpcode.FABRICS
    assert raw[4] == FabricsCommandType.PROPERTY_GET
    assert raw[40] == 1
    assert struct.unpack_from("<I", raw, 44)[0] == 0
    access = PropertyAccess.from_command(Command.unpack_from(raw))
    assert access == PropertyAccess(offset=0, size=8, value=0)
    assert property_get_command(0x1C).cdw10 == 0


def test_property_set_bytes() -> None:
    raw = property_set_command(0x14, 0x00460001).to_bytes()
    assert raw[4] == FabricsCommandType.PROPERTY_SET
    assert raw[40] == 0
    assert struct.unpack_from("<IQ", raw, 44) == (0x14, 0x00460001)
    assert PropertyAccess.from_command(Command.unpack_from(raw)) == PropertyAccess(
        0x14, 4, 0x00460001
    )


@given(st.sampled_from([0x00, 0x08, 0x14, 0x1C]), st.integers(0, 2**64 - 1))
def test_property_set_round_trip_8(offset: int, value: int) -> None:
    cmd = property_set_command(offset, value, size=8)
    assert PropertyAccess.from_command(cmd) == PropertyAccess(offset, 8, value)


def test_property_rejects_bad_size_and_attrib() -> None:
    with pytest.raises(ValueError, match="4 or 8"):
        property_get_command(0, size=2)
    with pytest.raises(ValueError, match="fit"):
        property_set_command(0x14, 1 << 32)
    with pytest.raises(ValueError, match="ATTRIB"):
        PropertyAccess.from_command(Command(opcode=0x7F, nsid=4, cdw10=2))


def test_disconnect_and_discovery_nqn() -> None:
    cmd = disconnect_command(cid=7)
    assert (cmd.opcode, cmd.fctype, cmd.cid) == (0x7F, FabricsCommandType.DISCONNECT, 7)
    assert DISCOVERY_NQN == "nqn.2014-08.org.nvmexpress.discovery"


def test_connect_invalid_parameter_dw0() -> None:
    assert connect_invalid_parameter_dw0(256, in_data=True) == 0x00010100
    assert connect_invalid_parameter_dw0(42, in_data=False) == 42
