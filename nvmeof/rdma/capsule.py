"""Command and response capsules of NVMe/RDMA, and the data pointers a host puts in an SQE.

A command capsule is one SEND: the 64-byte SQE, then in-capsule data (at ICDOFF 0). A response
capsule is one SEND of the 16-byte CQE. Host memory is described by a keyed SGL data block
(0x40; 0x4F asks the controller to invalidate the key with Send with Invalidate), whose length is
24 bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from nvmeof.spec.completion import Completion
from nvmeof.spec.sgl import SglDescriptor, SglIdentifier, SglType

SQE_SIZE = 64
CQE_SIZE = 16
MAX_KEYED_LENGTH = (1 << 24) - 1

Buffer = bytes | bytearray | memoryview


class CapsuleError(ValueError):
    """A capsule too short or too long for what it must hold (connection-fatal on RDMA)."""


@attrs.frozen
class CommandCapsule:
    """A received command capsule: views into the receive buffer it landed in."""

    sqe: memoryview
    data: memoryview | None


def pack_command_capsule(into: memoryview, sqe: Buffer, in_capsule: Sequence[Buffer] = ()) -> int:
    """Lay the SQE and its in-capsule data into ``into``; return the capsule's length."""
    if len(sqe) != SQE_SIZE:
        raise CapsuleError(f"an SQE is {SQE_SIZE} bytes, not {len(sqe)}")
    total = SQE_SIZE + sum(len(b) for b in in_capsule)
    if total > len(into):
        raise CapsuleError(f"capsule of {total} bytes exceeds the {len(into)}-byte buffer")
    into[:SQE_SIZE] = sqe
    offset = SQE_SIZE
    for buf in in_capsule:
        into[offset : offset + len(buf)] = buf
        offset += len(buf)
    return total


def parse_command_capsule(buf: memoryview, length: int) -> CommandCapsule:
    """Split ``length`` received bytes into the SQE and in-capsule data (None if there is none)."""
    if length < SQE_SIZE:
        raise CapsuleError(f"command capsule of {length} bytes is shorter than an SQE")
    if length > len(buf):
        raise CapsuleError(f"command capsule of {length} bytes exceeds its {len(buf)}-byte buffer")
    data = buf[SQE_SIZE:length] if length > SQE_SIZE else None
    return CommandCapsule(sqe=buf[:SQE_SIZE], data=data)


def parse_response_capsule(buf: Buffer, length: int) -> Completion:
    if length < CQE_SIZE:
        raise CapsuleError(f"response capsule of {length} bytes is shorter than a CQE")
    return Completion.unpack_from(buf)


def pack_response_capsule(into: memoryview, completion: Completion) -> int:
    completion.pack_into(into)
    return CQE_SIZE


def keyed_sgl(address: int, length: int, rkey: int, *, invalidate: bool = False) -> SglDescriptor:
    """A keyed data block naming ``length`` bytes of host memory at ``address`` under ``rkey``."""
    if not 0 <= length <= MAX_KEYED_LENGTH:
        raise ValueError(f"a keyed SGL holds at most {MAX_KEYED_LENGTH} bytes, not {length}")
    ident = (
        SglIdentifier.KEYED_DATA_BLOCK_INVALIDATE if invalidate else SglIdentifier.KEYED_DATA_BLOCK
    )
    return SglDescriptor(address, length, rkey, ident)


def null_sgl() -> SglDescriptor:
    """No data: a keyed data block of length 0, key 0 (as Linux's ``nvme_rdma_set_sg_null``)."""
    return SglDescriptor(0, 0, 0, SglIdentifier.KEYED_DATA_BLOCK)


def in_capsule_sgl(length: int, offset: int = 0) -> SglDescriptor:
    return SglDescriptor(offset, length, 0, SglIdentifier.DATA_BLOCK_OFFSET)


def wants_invalidate(desc: SglDescriptor) -> bool:
    return desc.identifier == SglIdentifier.KEYED_DATA_BLOCK_INVALIDATE


def is_in_capsule(desc: SglDescriptor) -> bool:
    return desc.identifier == SglIdentifier.DATA_BLOCK_OFFSET


def is_keyed(desc: SglDescriptor) -> bool:
    return desc.sgl_type == SglType.KEYED_DATA_BLOCK and desc.subtype in (0x0, 0xF)
