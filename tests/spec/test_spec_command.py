"""SQE, CQE, SGL and status codecs: round trips and golden vectors from REFERENCE.md."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nvmeof.spec.command import SQE_SIZE, AdminOpcode, Command, DataDirection
from nvmeof.spec.completion import CQE_SIZE, Completion
from nvmeof.spec.sgl import SGL_DESCRIPTOR_SIZE, SglDescriptor, SglIdentifier
from nvmeof.spec.status import GenericStatus, Status, StatusCodeType

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)

unkeyed_ids = st.sampled_from(
    [SglIdentifier.DATA_BLOCK_OFFSET, SglIdentifier.TRANSPORT_DATA_BLOCK, 0x31, 0x00]
)
unkeyed = st.builds(SglDescriptor, address=u64, length=u32, key=st.just(0), identifier=unkeyed_ids)
keyed = st.builds(
    SglDescriptor,
    address=u64,
    length=st.integers(0, 0xFFFFFF),
    key=u32,
    identifier=st.sampled_from([0x40, 0x4F]),
)
sgls = st.one_of(unkeyed, keyed)

commands = st.builds(
    Command,
    opcode=u8,
    cid=u16,
    nsid=u32,
    flags=u8,
    cdw2=u32,
    cdw3=u32,
    mptr=u64,
    dptr=sgls,
    cdw10=u32,
    cdw11=u32,
    cdw12=u32,
    cdw13=u32,
    cdw14=u32,
    cdw15=u32,
)

statuses = st.builds(
    Status,
    sct=st.integers(0, 7),
    sc=u8,
    dnr=st.booleans(),
    more=st.booleans(),
    crd=st.integers(0, 3),
)


@given(sgls)
def test_sgl_round_trip(sgl: SglDescriptor) -> None:
    buf = bytearray(SGL_DESCRIPTOR_SIZE)
    sgl.pack_into(buf)
    assert buf[15] == sgl.identifier
    assert SglDescriptor.unpack_from(buf) == sgl


@given(commands)
def test_command_round_trip(cmd: Command) -> None:
    raw = cmd.to_bytes()
    assert len(raw) == SQE_SIZE
    assert Command.unpack_from(raw) == cmd
    shifted = bytearray(3) + raw
    assert Command.unpack_from(shifted, 3) == cmd


@given(statuses)
def test_status_field_round_trip(status: Status) -> None:
    field = status.to_field()
    assert field & 1 == 0  # phase bit is never set on fabrics
    assert Status.from_field(field) == status


@given(st.builds(Completion, cid=u16, status=statuses, dw0=u32, dw1=u32, sqhd=u16, sqid=u16))
def test_completion_round_trip(cqe: Completion) -> None:
    raw = cqe.to_bytes()
    assert len(raw) == CQE_SIZE
    assert Completion.unpack_from(raw) == cqe
    assert cqe.result == cqe.dw0 | cqe.dw1 << 32


def test_status_golden_values() -> None:
    assert Status.generic(GenericStatus.INVALID_FIELD, dnr=True).to_field() == 0x8004
    assert Status.generic(0x87, dnr=False).to_field() == 0x010E
    assert Status.generic(0x87, dnr=True).to_field() == 0x810E
    parsed = Status.from_field(0x8004)
    assert parsed.sct == StatusCodeType.GENERIC
    assert parsed.sc == GenericStatus.INVALID_FIELD
    assert parsed.dnr


def test_cqe_golden_bytes() -> None:
    cqe = Completion(cid=0x1234, status=Status.generic(0x02), dw0=0xAABBCCDD, sqhd=5, sqid=1)
    raw = cqe.to_bytes()
    assert raw == bytes.fromhex("ddccbbaa 00000000 0500 0100 3412 0480".replace(" ", ""))


def test_store_sqe_golden_vector() -> None:
    """REFERENCE 6.3: Store key "abc", 8-byte value in capsule, NSID 1, CID 4."""
    cmd = Command(
        opcode=0x01,
        cid=4,
        nsid=1,
        cdw2=int.from_bytes(b"abc", "little"),
        dptr=SglDescriptor(length=8, identifier=SglIdentifier.DATA_BLOCK_OFFSET),
        cdw10=8,
        cdw11=3,
    )
    expected = bytes.fromhex(
        "0140040001000000"
        "6162630000000000"
        "0000000000000000"
        "0000000000000000" "0800000000000001"
        "08000000"
        "03000000"
        + "00" * 16
    )  # fmt: skip
    assert cmd.to_bytes() == expected
    assert Command.unpack_from(expected) == cmd


def test_keyed_sgl_layout() -> None:
    sgl = SglDescriptor(
        address=0x1122334455667788, length=0x123456, key=0xDEADBEEF, identifier=0x4F
    )
    buf = bytearray(16)
    sgl.pack_into(buf)
    assert buf[8:11] == bytes([0x56, 0x34, 0x12])
    assert buf[11:15] == (0xDEADBEEF).to_bytes(4, "little")
    assert sgl.keyed
    assert sgl.subtype == 0xF


def test_data_direction() -> None:
    assert Command(opcode=0x01).data_direction == DataDirection.HOST_TO_CONTROLLER
    assert Command(opcode=0x02).data_direction == DataDirection.CONTROLLER_TO_HOST
    connect = Command(opcode=AdminOpcode.FABRICS, nsid=0x01)
    assert connect.fctype == 1
    assert connect.data_direction == DataDirection.HOST_TO_CONTROLLER
    prop_get = Command(opcode=AdminOpcode.FABRICS, nsid=0x04)
    assert prop_get.data_direction == DataDirection.NONE
