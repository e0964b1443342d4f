"""NVMe/RDMA codecs: RDMA-CM private data and capsules (REFERENCE.md section 7, 2.5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmeof.rdma.capsule import (
    CQE_SIZE,
    CapsuleError,
    in_capsule_sgl,
    keyed_sgl,
    null_sgl,
    pack_command_capsule,
    pack_response_capsule,
    parse_command_capsule,
    parse_response_capsule,
    wants_invalidate,
)
from nvmeof.rdma.cm import (
    AcceptData,
    ConnectRequestData,
    PrivateDataError,
    QueueLimits,
    RejectData,
    RejectStatus,
    check_connect_request,
)
from nvmeof.spec.completion import Completion
from nvmeof.spec.sgl import SglDescriptor
from nvmeof.spec.status import Status

u16 = st.integers(0, 0xFFFF)


def test_connect_request_golden_linux_admin_queue() -> None:
    # Linux nvme-rdma, admin queue: RECFMT 0, QID 0, HRQSIZE 32, HSQSIZE 31 (0's based).
    data = ConnectRequestData(qid=0, hrqsize=32, hsqsize=31).pack()
    assert data == bytes.fromhex("0000000020001f000000") + bytes(22)
    assert len(data) == 32


def test_connect_request_golden_io_queue_with_cntlid() -> None:
    data = ConnectRequestData(qid=3, hrqsize=128, hsqsize=127, cntlid=0x0102).pack()
    assert data[:10] == bytes.fromhex("0000030080007f000201")


def test_accept_and_reject_golden() -> None:
    assert AcceptData(crqsize=32).pack() == bytes.fromhex("00002000") + bytes(28)
    assert RejectData(RejectStatus.INVALID_RECFMT).pack() == bytes.fromhex("00000200")
    assert RejectData(RejectStatus.NO_RESOURCES).pack() == bytes.fromhex("00000600")


def test_reject_codes_have_the_spec_values() -> None:
    assert [s.value for s in RejectStatus] == list(range(1, 9))


@given(qid=u16, hrqsize=u16, hsqsize=u16, cntlid=u16)
def test_connect_request_round_trip(qid: int, hrqsize: int, hsqsize: int, cntlid: int) -> None:
    request = ConnectRequestData(qid=qid, hrqsize=hrqsize, hsqsize=hsqsize, cntlid=cntlid)
    assert ConnectRequestData.unpack(request.pack()) == request


@given(crqsize=u16)
def test_accept_round_trip(crqsize: int) -> None:
    assert AcceptData.unpack(AcceptData(crqsize).pack()) == AcceptData(crqsize)


@given(status=u16)
def test_reject_round_trip(status: int) -> None:
    assert RejectData.unpack(RejectData(status).pack()) == RejectData(status)


@given(padding=st.binary(max_size=24))
def test_connect_request_accepts_cm_padding(padding: bytes) -> None:
    # An IB CM REQ delivers 56 bytes of private data: the first 32 are ours.
    request = ConnectRequestData(qid=1, hrqsize=64, hsqsize=63)
    assert ConnectRequestData.unpack(request.pack() + padding) == request


LIMITS = QueueLimits(1024, 64)


def _status(data: bytes) -> RejectStatus:
    with pytest.raises(PrivateDataError) as exc:
        check_connect_request(data, LIMITS)
    return exc.value.status


def test_connect_request_validation_gives_reject_codes() -> None:
    good = ConnectRequestData(qid=1, hrqsize=32, hsqsize=31)
    assert check_connect_request(good.pack(), QueueLimits(1024, 64)) == good
    assert _status(good.pack()[:31]) is RejectStatus.INVALID_PRIVATE_DATA_LENGTH
    assert _status(b"\x01\x00" + good.pack()[2:]) is RejectStatus.INVALID_RECFMT
    assert _status(ConnectRequestData(65, 32, 31).pack()) is RejectStatus.INVALID_QID
    assert _status(ConnectRequestData(1, 32, 1024).pack()) is RejectStatus.INVALID_HSQSIZE
    assert _status(ConnectRequestData(1, 32, 0).pack()) is RejectStatus.INVALID_HSQSIZE
    assert _status(ConnectRequestData(1, 0, 31).pack()) is RejectStatus.INVALID_HRQSIZE
    assert RejectData(99).describe() == "status 99"


def test_keyed_sgl_golden() -> None:
    desc = keyed_sgl(0x1122334455667788, 0x123456, 0xAABBCCDD, invalidate=True)
    buf = bytearray(16)
    desc.pack_into(buf)
    assert bytes(buf) == bytes.fromhex("8877665544332211563412ddccbbaa4f")
    assert wants_invalidate(desc)
    assert SglDescriptor.unpack_from(buf) == desc
    buf2 = bytearray(16)
    null_sgl().pack_into(buf2)
    assert bytes(buf2) == bytes(15) + b"\x40"
    in_capsule_sgl(100).pack_into(buf2)
    assert bytes(buf2) == bytes(8) + (100).to_bytes(4, "little") + bytes(3) + b"\x01"


def test_keyed_sgl_length_is_24_bits() -> None:
    keyed_sgl(0, (1 << 24) - 1, 1)
    with pytest.raises(ValueError, match="at most"):
        keyed_sgl(0, 1 << 24, 1)


@given(
    address=st.integers(0, (1 << 64) - 1),
    length=st.integers(0, (1 << 24) - 1),
    key=st.integers(0, (1 << 32) - 1),
    invalidate=st.booleans(),
)
def test_keyed_sgl_round_trip(address: int, length: int, key: int, invalidate: bool) -> None:
    desc = keyed_sgl(address, length, key, invalidate=invalidate)
    buf = bytearray(16)
    desc.pack_into(buf)
    assert SglDescriptor.unpack_from(buf) == desc


@given(sqe=st.binary(min_size=64, max_size=64), data=st.lists(st.binary(max_size=64), max_size=4))
def test_command_capsule_round_trip(sqe: bytes, data: list[bytes]) -> None:
    buf = memoryview(bytearray(64 + 256))
    length = pack_command_capsule(buf, sqe, data)
    capsule = parse_command_capsule(buf, length)
    assert bytes(capsule.sqe) == sqe
    joined = b"".join(data)
    assert (bytes(capsule.data) if capsule.data is not None else b"") == joined


def test_capsule_length_errors() -> None:
    buf = memoryview(bytearray(80))
    with pytest.raises(CapsuleError):
        parse_command_capsule(buf, 63)
    with pytest.raises(CapsuleError):
        pack_command_capsule(buf, bytes(64), [bytes(17)])
    with pytest.raises(CapsuleError):
        parse_response_capsule(bytes(15), 15)


def test_response_capsule_round_trip() -> None:
    completion = Completion(cid=7, status=Status.generic(0x87), dw0=5, sqhd=3, sqid=1)
    buf = memoryview(bytearray(CQE_SIZE))
    assert pack_response_capsule(buf, completion) == CQE_SIZE
    assert parse_response_capsule(buf, CQE_SIZE) == completion
