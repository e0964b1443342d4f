"""Features, Get Log Page, and the small admin commands."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmeof.spec.admin import (
    abort_command,
    async_event_request_command,
    decode_abort,
    keep_alive_command,
)
from nvmeof.spec.command import AdminOpcode, Command
from nvmeof.spec.features import (
    CommandEffect,
    FeatureId,
    FeatureParameters,
    FeatureSelect,
    LogPageId,
    LogPageParameters,
    decode_number_of_queues,
    encode_number_of_queues,
    get_features_command,
    get_log_page_command,
    pack_commands_supported_and_effects,
    set_features_command,
)


def test_get_features_layout() -> None:
    cmd = get_features_command(FeatureId.KEEP_ALIVE_TIMER, select=FeatureSelect.DEFAULT, cid=5)
    raw = cmd.to_bytes()
    assert raw[0] == 0x0A
    assert struct.unpack_from("<I", raw, 40)[0] == 0x010F
    params = FeatureParameters.from_command(Command.unpack_from(raw))
    assert params == FeatureParameters(fid=0x0F, select=1, save=False, cdw11=0, nsid=0)


def test_set_features_layout() -> None:
    value = encode_number_of_queues(7, 3)
    assert value == 0x00030007
    cmd = set_features_command(FeatureId.NUMBER_OF_QUEUES, value, save=True, nsid=1)
    raw = cmd.to_bytes()
    assert raw[0] == 0x09
    assert struct.unpack_from("<II", raw, 40) == (0x80000007, 0x00030007)
    params = FeatureParameters.from_command(cmd)
    assert params.save
    assert params.fid == 7
    assert params.nsid == 1
    assert decode_number_of_queues(params.cdw11) == (7, 3)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_number_of_queues_round_trip(nsqr: int, ncqr: int) -> None:
    assert decode_number_of_queues(encode_number_of_queues(nsqr, ncqr)) == (nsqr, ncqr)


def test_get_log_page_layout() -> None:
    cmd = get_log_page_command(
        LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS, 4096, csi=1, rae=True, lsp=1, cid=2
    )
    raw = cmd.to_bytes()
    assert raw[0] == 0x02
    cdw10, cdw11, cdw12, cdw13, cdw14 = struct.unpack_from("<5I", raw, 40)
    assert cdw10 == 0x05 | 1 << 8 | 1 << 15 | 1023 << 16
    assert (cdw11, cdw12, cdw13) == (0, 0, 0)
    assert cdw14 == 1 << 24
    assert struct.unpack_from("<I", raw, 32)[0] == 4096
    assert LogPageParameters.from_command(Command.unpack_from(raw)) == LogPageParameters(
        lid=5, lsp=1, rae=True, length=4096, offset=0, csi=1, nsid=0
    )


def test_get_log_page_large_numd_and_offset() -> None:
    cmd = get_log_page_command(LogPageId.DISCOVERY, 4 << 20, offset=(1 << 33) + 1024)
    assert cmd.cdw10 >> 16 == 0xFFFF
    assert cmd.cdw11 == 0x000F
    assert (cmd.cdw12, cmd.cdw13) == (1024, 2)
    params = LogPageParameters.from_command(cmd)
    assert params.length == 4 << 20
    assert params.offset == (1 << 33) + 1024


@given(
    st.integers(1, 2**20).map(lambda n: n * 4),
    st.integers(0, 2**62).map(lambda n: n * 4),
    st.integers(0, 255),
    st.integers(0, 0x7F),
    st.booleans(),
)
def test_log_page_round_trip(length: int, offset: int, csi: int, lsp: int, rae: bool) -> None:
    cmd = get_log_page_command(0x70, length, offset=offset, csi=csi, lsp=lsp, rae=rae, nsid=9)
    assert LogPageParameters.from_command(cmd) == LogPageParameters(
        0x70, lsp, rae, length, offset, csi, 9
    )


def test_get_log_page_rejects_unaligned() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        get_log_page_command(0x70, 10)
    with pytest.raises(ValueError, match="multiple of 4"):
        get_log_page_command(0x70, 0)


def test_effects_log() -> None:
    data = pack_commands_supported_and_effects(
        {AdminOpcode.IDENTIFY: CommandEffect.CSUPP}, {0x01: 0x3, 0x14: 0x1}
    )
    assert len(data) == 4096
    assert struct.unpack_from("<I", data, 4 * 0x06)[0] == 1
    assert struct.unpack_from("<I", data, 1024 + 4 * 0x01)[0] == 3
    assert struct.unpack_from("<I", data, 1024 + 4 * 0x14)[0] == 1
    assert struct.unpack_from("<I", data, 1024 + 4 * 0x02)[0] == 0
    with pytest.raises(ValueError, match="opcode"):
        pack_commands_supported_and_effects({256: 1}, {})


def test_small_admin_commands() -> None:
    assert keep_alive_command(3).opcode == AdminOpcode.KEEP_ALIVE
    assert keep_alive_command(3).cid == 3
    assert async_event_request_command().opcode == AdminOpcode.ASYNC_EVENT_REQUEST
    abort = abort_command(2, 0x1234, cid=1)
    assert abort.opcode == AdminOpcode.ABORT
    assert abort.cdw10 == 0x12340002
    assert decode_abort(abort) == (2, 0x1234)
