"""KV command set codecs: key placement, builders, identify pages, list data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvext.spec import (
    KV_CSI,
    KV_IO_COMMAND_EFFECTS,
    KV_SPEC_VERSION,
    MAX_KEY_LENGTH,
    KvCommandFields,
    KvFormat,
    KvIdentifyController,
    KvIdentifyNamespace,
    KvOpcode,
    KvStatus,
    RetrieveOption,
    StoreOption,
    decode_key_list,
    delete_command,
    encode_key_list,
    exist_command,
    kv_status,
    list_command,
    pack_key,
    retrieve_command,
    store_command,
)
from nvmeof.spec.command import Command
from nvmeof.spec.sgl import SglDescriptor, SglIdentifier
from nvmeof.spec.status import StatusCodeType

keys = st.binary(min_size=1, max_size=MAX_KEY_LENGTH)


def test_constants() -> None:
    assert KV_CSI == 1
    assert KV_SPEC_VERSION == 0x00010300
    assert [int(o) for o in KvOpcode] == [0x00, 0x01, 0x02, 0x06, 0x10, 0x14]
    assert KV_IO_COMMAND_EFFECTS == {0x01: 3, 0x10: 3, 0x02: 1, 0x06: 1, 0x14: 1, 0x00: 1}


def test_kv_status_is_generic_with_dnr() -> None:
    status = kv_status(KvStatus.KEY_DOES_NOT_EXIST)
    assert status.sct == StatusCodeType.GENERIC
    assert status.sc == 0x87
    assert status.dnr
    assert status.to_field() == 0x810E


def test_store_golden_vector() -> None:
    """REFERENCE 6.3 byte example."""
    cmd = store_command(
        1,
        b"abc",
        8,
        cid=4,
        dptr=SglDescriptor(length=8, identifier=SglIdentifier.DATA_BLOCK_OFFSET),
    )
    expected = bytes.fromhex(
        "0140040001000000" "6162630000000000" + "00" * 8 + "00" * 8 + "0800000000000001"
        "08000000" "03000000" + "00" * 16
    )  # fmt: skip
    assert cmd.to_bytes() == expected


def test_short_key_placement() -> None:
    raw = exist_command(1, b"abc").to_bytes()
    assert raw[8:11] == b"abc"
    assert raw[11:16] == bytes(5)
    assert raw[56:64] == bytes(8)
    assert raw[44] == 3


def test_full_key_placement() -> None:
    key = bytes(range(0x41, 0x51))  # 16 bytes
    raw = retrieve_command(2, key, 4096, options=RetrieveOption.RAW).to_bytes()
    assert raw[8:16] == key[:8]
    assert raw[56:64] == key[8:]
    assert struct.unpack_from("<II", raw, 40) == (4096, 16 | 1 << 8)
    assert pack_key(key) == struct.unpack("<4I", key)


def test_pack_key_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="key length"):
        pack_key(b"")
    with pytest.raises(ValueError, match="key length"):
        pack_key(bytes(17))
    with pytest.raises(ValueError, match="key length"):
        store_command(1, bytes(17), 8)


def test_store_options_on_the_wire() -> None:
    cmd = store_command(1, b"k", 100, options=StoreOption.MUST_NOT_EXIST | StoreOption.NO_COMPRESS)
    assert cmd.cdw11 == 1 | 0x06 << 8
    assert cmd.flags == 0x40
    assert cmd.dptr == SglDescriptor(length=100)
    fields = KvCommandFields.from_command(cmd)
    assert fields == KvCommandFields(key=b"k", key_length=1, options=6, size=100)


def test_delete_and_exist_have_no_data() -> None:
    for cmd, opcode in ((delete_command(3, b"xy"), 0x10), (exist_command(3, b"xy"), 0x14)):
        assert cmd.opcode == opcode
        assert cmd.nsid == 3
        assert cmd.dptr == SglDescriptor()
        assert cmd.cdw10 == 0


def test_list_command_with_and_without_start_key() -> None:
    empty = list_command(1, 8192)
    assert empty.opcode == 0x06
    assert empty.cdw11 == 0
    assert KvCommandFields.from_command(empty).key == b""
    started = list_command(1, 8192, start_key=b"hello")
    assert KvCommandFields.from_command(started) == KvCommandFields(b"hello", 5, 0, 8192)


def test_fields_clamp_long_key_length() -> None:
    cmd = Command(opcode=0x01, cdw2=0x64636261, cdw11=200)
    fields = KvCommandFields.from_command(cmd)
    assert fields.key_length == 200
    assert len(fields.key) == 16
    assert fields.key[:4] == b"abcd"


@given(keys, st.integers(0, 2**32 - 1), st.integers(0, 0xFF), st.integers(0, 0xFFFF))
def test_command_fields_round_trip(key: bytes, size: int, options: int, cid: int) -> None:
    for cmd in (
        store_command(1, key, size, options=options, cid=cid),
        retrieve_command(1, key, size, options=options, cid=cid),
    ):
        parsed = Command.unpack_from(cmd.to_bytes())
        assert KvCommandFields.from_command(parsed) == KvCommandFields(key, len(key), options, size)


def test_kv_identify_namespace_layout() -> None:
    ns = KvIdentifyNamespace(
        nsze=1 << 30,
        nuse=4096,
        nsfeat=8,
        nmic=1,
        novg=512,
        anagrpid=2,
        nsattr=1,
        nvmsetid=3,
        endgid=4,
        nguid=bytes(range(16)),
        eui64=0x1122334455667788,
        formats=(KvFormat(max_value_length=131072, max_num_keys=1000),),
    )
    data = ns.pack()
    assert len(data) == 4096
    assert struct.unpack_from("<Q8xQ", data, 0) == (1 << 30, 4096)
    assert data[24] == 8
    assert data[25] == 0  # NKVF is 0's based
    assert data[26] == 1
    assert data[29] == 0
    assert struct.unpack_from("<II", data, 32) == (512, 2)
    assert data[43] == 1
    assert struct.unpack_from("<HH", data, 44) == (3, 4)
    assert data[48:64] == bytes(range(16))
    assert struct.unpack_from("<Q", data, 64)[0] == 0x1122334455667788
    assert data[72:88] == bytes.fromhex("1000000000000200e803000000000000")
    assert data[88:] == bytes(4096 - 88)
    assert KvIdentifyNamespace.unpack(data) == ns


kv_formats = st.builds(
    KvFormat,
    max_key_length=st.integers(0, 0xFFFF),
    relative_performance=st.integers(0, 3),
    max_value_length=st.integers(0, 2**32 - 1),
    max_num_keys=st.integers(0, 2**32 - 1),
)


@given(
    st.lists(kv_formats, min_size=1, max_size=16),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=16, max_size=16),
)
def test_kv_identify_namespace_round_trip(formats: list[KvFormat], nsze: int, nguid: bytes) -> None:
    ns = KvIdentifyNamespace(nsze=nsze, nguid=nguid, formats=tuple(formats))
    assert KvIdentifyNamespace.unpack(ns.pack()) == ns


def test_kv_identify_namespace_rejects_format_counts() -> None:
    with pytest.raises(ValueError, match="formats"):
        KvIdentifyNamespace(formats=()).pack()
    with pytest.raises(ValueError, match="formats"):
        KvIdentifyNamespace(formats=(KvFormat(),) * 17).pack()


def test_kv_identify_controller() -> None:
    data = KvIdentifyController().pack()
    assert data[:4] == bytes([0x00, 0x03, 0x01, 0x00])
    assert data[4:] == bytes(4092)
    assert KvIdentifyController.unpack(data) == KvIdentifyController(KV_SPEC_VERSION)


def test_key_list_padding() -> None:
    data = encode_key_list([b"abc", b"xy"], 4096)
    assert data == bytes.fromhex("02000000030061626300000002007879")
    assert decode_key_list(data) == [b"abc", b"xy"]
    # a 4-byte-aligned key needs a full pad word: KL 2 + 2 bytes = 4; KL 4 + 2 = 8
    assert len(encode_key_list([b"abcd"], 4096)) == 4 + 8


def test_key_list_truncates_to_buffer() -> None:
    all_keys = [b"abc", b"xy", b"0123456789abcdef"]
    assert decode_key_list(encode_key_list(all_keys, 12)) == [b"abc"]
    assert decode_key_list(encode_key_list(all_keys, 15)) == [b"abc"]
    assert decode_key_list(encode_key_list(all_keys, 16)) == [b"abc", b"xy"]
    assert encode_key_list(all_keys, 4) == bytes(4)
    assert encode_key_list(all_keys, 3) == bytes(3)
    assert encode_key_list(all_keys, 0) == b""


def test_key_list_decode_errors() -> None:
    with pytest.raises(ValueError, match="NRK"):
        decode_key_list(b"\x01")
    with pytest.raises(ValueError, match="overruns"):
        decode_key_list(bytes.fromhex("020000000300616263000000"))
    with pytest.raises(ValueError, match="overruns"):
        decode_key_list(bytes.fromhex("0100000003006162"))
    with pytest.raises(ValueError, match="key length"):
        decode_key_list(bytes.fromhex("0100000000000000"))


@given(st.lists(keys, max_size=50), st.integers(0, 2048))
def test_key_list_round_trip(key_list: list[bytes], buffer_size: int) -> None:
    data = encode_key_list(key_list, buffer_size)
    assert len(data) <= buffer_size
    if buffer_size < 4:
        return
    decoded = decode_key_list(data)
    assert decoded == key_list[: len(decoded)]
    if len(decoded) < len(key_list):
        next_size = (2 + len(key_list[len(decoded)]) + 3) // 4 * 4
        assert len(data) + next_size > buffer_size
    # trailing buffer space is ignored
    assert decode_key_list(data + bytes(64)) == decoded


@given(st.binary(max_size=256))
def test_key_list_decode_total(buf: bytes) -> None:
    try:
        decoded = decode_key_list(buf)
    except ValueError:
        return
    assert all(1 <= len(k) <= MAX_KEY_LENGTH for k in decoded)
