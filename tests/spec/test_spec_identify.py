"""Identify command and data structures: golden offsets and round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmeof.spec.command import Command
from nvmeof.spec.identify import (
    IDENTIFY_DATA_SIZE,
    Cns,
    CommandSetIdentifier,
    ControllerType,
    CsiIndependentNamespace,
    IdentifyController,
    IdentifyNamespace,
    IdentifyParameters,
    LbaFormat,
    NamespaceIdDescriptor,
    NamespaceIdType,
    identify_command,
    pack_io_command_set_vectors,
    pack_namespace_id_descriptors,
    pack_namespace_list,
    unpack_io_command_set_vectors,
    unpack_namespace_id_descriptors,
    unpack_namespace_list,
)

SUBNQN = "nqn.2016-06.io.gpucache:kv0"


def test_identify_command_layout() -> None:
    cmd = identify_command(Cns.CSI_NAMESPACE, nsid=1, cntid=0x1234, csi=1, cid=3)
    raw = cmd.to_bytes()
    assert raw[0] == 0x06
    assert struct.unpack_from("<I", raw, 4)[0] == 1
    assert struct.unpack_from("<II", raw, 40) == (0x12340005, 0x01000000)
    assert struct.unpack_from("<I", raw, 32)[0] == IDENTIFY_DATA_SIZE
    params = IdentifyParameters.from_command(Command.unpack_from(raw))
    assert params == IdentifyParameters(cns=5, cntid=0x1234, csi=1, nsid=1)


def test_identify_controller_golden_offsets() -> None:
    ctrl = IdentifyController(
        sn="SN123",
        mn="GPUCache KV",
        fr="1.0",
        cntlid=0x0102,
        subnqn=SUBNQN,
        ioccsz=516,
        iorcsz=1,
        sgls=0x00100001,
        kas=10,
        maxcmd=128,
        nn=4,
        mnan=4,
        cntrltype=ControllerType.IO,
        ieee=0x123456,
        fguid=bytes(range(16)),
    )
    data = ctrl.pack()
    assert len(data) == IDENTIFY_DATA_SIZE
    assert data[4:24] == b"SN123".ljust(20)
    assert data[24:64] == b"GPUCache KV".ljust(40)
    assert data[64:72] == b"1.0     "
    assert data[72] == 6
    assert data[73:76] == bytes([0x56, 0x34, 0x12])
    assert data[78:80] == b"\x02\x01"
    assert struct.unpack_from("<I", data, 80)[0] == 0x00020000
    assert data[111] == 1
    assert data[112:128] == bytes(range(16))
    assert struct.unpack_from("<H", data, 320)[0] == 10
    assert data[512] == 0x66
    assert data[513] == 0x44
    assert struct.unpack_from("<HI", data, 514) == (128, 4)
    assert struct.unpack_from("<I", data, 536)[0] == 0x00100001
    assert struct.unpack_from("<I", data, 540)[0] == 4
    assert data[768 : 768 + len(SUBNQN)] == SUBNQN.encode()
    assert data[768 + len(SUBNQN) : 1024] == bytes(1024 - 768 - len(SUBNQN))
    assert struct.unpack_from("<IIH", data, 1792) == (516, 1, 0)
    assert data[1803] == 1  # MSDBD
    assert data[2048:] == bytes(2048)
    assert IdentifyController.unpack(data) == ctrl


def test_identify_controller_defaults_satisfy_linux() -> None:
    ctrl = IdentifyController.unpack(IdentifyController().pack())
    assert ctrl.kas != 0
    assert ctrl.ioccsz >= 4
    assert ctrl.iorcsz >= 1
    assert ctrl.icdoff == 0
    assert ctrl.sgls & 0x3 != 0
    assert (ctrl.sqes, ctrl.cqes) == (0x66, 0x44)


def test_identify_controller_rejects_long_strings() -> None:
    with pytest.raises(ValueError, match="sn"):
        IdentifyController(sn="x" * 21).pack()
    with pytest.raises(ValueError, match="subnqn"):
        IdentifyController(subnqn="n" * 256).pack()


ascii_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E))


@given(
    sn=ascii_text.filter(lambda s: len(s) <= 20),
    mn=ascii_text.filter(lambda s: len(s) <= 40),
    cntlid=st.integers(0, 0xFFFF),
    ver=st.integers(0, 2**32 - 1),
    oaes=st.integers(0, 2**32 - 1),
    nn=st.integers(0, 2**32 - 1),
    ioccsz=st.integers(0, 2**32 - 1),
    ofcs=st.integers(0, 0xFFFF),
    dctype=st.integers(0, 0xFF),
)
def test_identify_controller_round_trip(
    sn: str, mn: str, cntlid: int, ver: int, oaes: int, nn: int, ioccsz: int, ofcs: int, dctype: int
) -> None:
    ctrl = IdentifyController(
        sn=sn, mn=mn, cntlid=cntlid, ver=ver, oaes=oaes, nn=nn, ioccsz=ioccsz, ofcs=ofcs,
        dctype=dctype,
    )  # fmt: skip
    assert IdentifyController.unpack(ctrl.pack()) == ctrl


def test_identify_namespace_golden_offsets() -> None:
    ns = IdentifyNamespace(
        nsze=1000,
        ncap=1000,
        nuse=10,
        nlbaf=1,
        flbas=1,
        anagrpid=7,
        nsattr=1,
        nvmsetid=2,
        endgid=3,
        nguid=bytes(range(1, 17)),
        eui64=0x0102030405060708,
        lbaf=(LbaFormat(lbads=9), LbaFormat(ms=8, lbads=12, rp=2)),
    )
    data = ns.pack()
    assert struct.unpack_from("<QQQ", data, 0) == (1000, 1000, 10)
    assert data[25] == 1
    assert data[26] == 1
    assert struct.unpack_from("<I", data, 92)[0] == 7
    assert data[99] == 1
    assert struct.unpack_from("<HH", data, 100) == (2, 3)
    assert data[104:120] == bytes(range(1, 17))
    assert struct.unpack_from("<Q", data, 120)[0] == 0x0102030405060708
    assert data[128:132] == bytes([0, 0, 9, 0])
    assert data[132:136] == bytes([8, 0, 12, 2])
    assert IdentifyNamespace.unpack(data) == ns


lba_formats = st.builds(
    LbaFormat, ms=st.integers(0, 0xFFFF), lbads=st.integers(0, 255), rp=st.integers(0, 3)
)


@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(lba_formats, min_size=1, max_size=64),
    st.binary(min_size=16, max_size=16),
)
def test_identify_namespace_round_trip(
    nsze: int, ncap: int, lbaf: list[LbaFormat], nguid: bytes
) -> None:
    ns = IdentifyNamespace(nsze=nsze, ncap=ncap, nlbaf=len(lbaf) - 1, lbaf=tuple(lbaf), nguid=nguid)
    assert IdentifyNamespace.unpack(ns.pack()) == ns


def test_namespace_list() -> None:
    data = pack_namespace_list([1, 2, 7])
    assert len(data) == IDENTIFY_DATA_SIZE
    assert data[:16] == bytes([1, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0])
    assert unpack_namespace_list(data) == [1, 2, 7]
    full = list(range(1, 1025))
    assert unpack_namespace_list(pack_namespace_list(full)) == full
    with pytest.raises(ValueError, match="1024"):
        pack_namespace_list(range(1, 1026))
    with pytest.raises(ValueError, match="NSID"):
        pack_namespace_list([0])


@given(st.lists(st.integers(1, 2**32 - 1), max_size=1024))
def test_namespace_list_round_trip(nsids: list[int]) -> None:
    assert unpack_namespace_list(pack_namespace_list(nsids)) == nsids


def test_csi_descriptor_for_kv() -> None:
    data = pack_namespace_id_descriptors(
        [NamespaceIdDescriptor.csi(CommandSetIdentifier.KEY_VALUE)]
    )
    assert data[:5] == bytes([0x04, 0x01, 0x00, 0x00, 0x01])
    assert data[5:] == bytes(IDENTIFY_DATA_SIZE - 5)
    assert unpack_namespace_id_descriptors(data) == [NamespaceIdDescriptor(4, b"\x01")]


def test_descriptor_list_mixed() -> None:
    descs = [
        NamespaceIdDescriptor(NamespaceIdType.NGUID, bytes(range(16))),
        NamespaceIdDescriptor(NamespaceIdType.EUI64, bytes(8)),
        NamespaceIdDescriptor(NamespaceIdType.CSI, b"\x00"),
    ]
    data = pack_namespace_id_descriptors(descs)
    assert data[0:2] == b"\x02\x10"
    assert data[20:22] == b"\x01\x08"
    assert data[32:34] == b"\x04\x01"
    assert unpack_namespace_id_descriptors(data) == descs


def test_descriptor_overrun_raises() -> None:
    buf = bytearray(8)
    buf[0:2] = b"\x02\x10"
    with pytest.raises(ValueError, match="overruns"):
        unpack_namespace_id_descriptors(buf)


@given(st.binary(max_size=300))
def test_descriptor_decode_total(buf: bytes) -> None:
    try:
        descs = unpack_namespace_id_descriptors(buf)
    except ValueError:
        return
    assert all(0 < len(d.value) <= 255 for d in descs)


def test_csi_independent_namespace() -> None:
    ns = CsiIndependentNamespace(nmic=1, anagrpid=5, nsattr=1, nvmsetid=2, endgid=3)
    data = ns.pack()
    assert data[1] == 1
    assert struct.unpack_from("<I", data, 4)[0] == 5
    assert data[8] == 1
    assert struct.unpack_from("<HH", data, 10) == (2, 3)
    assert data[14] == 1  # NSTAT ready by default
    assert CsiIndependentNamespace.unpack(data) == ns


def test_io_command_set_vectors() -> None:
    data = pack_io_command_set_vectors([0x3])
    assert data[:8] == bytes([3, 0, 0, 0, 0, 0, 0, 0])
    vectors = unpack_io_command_set_vectors(data)
    assert len(vectors) == 512
    assert vectors[0] == 3
    assert not any(vectors[1:])
    with pytest.raises(ValueError, match="4096"):
        unpack_io_command_set_vectors(data[:100])
