"""Block namespaces through the command seam: ``BlockNamespace.execute`` with a scripted channel.

Statuses follow REFERENCE.md 5.1 (0x80 LBA Out of Range, 0x0F Data SGL Length Invalid, 0x01 for
opcodes the NVM set does not have here); bdev shapes follow ../shared/spdk/.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from nvmeof.errors import CommandError
from nvmeof.initiator.block import (
    BlockRange,
    deallocate_command,
    flush_command,
    pack_dsm_ranges,
    read_command,
    write_command,
    write_zeroes_command,
)
from nvmeof.spec.command import Command, NvmOpcode
from nvmeof.spec.completion import Completion
from nvmeof.spec.identify import IdentifyNamespace
from nvmeof.spec.sgl import SglDescriptor
from nvmeof.spec.status import GenericStatus, Status, StatusCodeType
from nvmeof.target.bdev.aio import AioBdev, IoMode
from nvmeof.target.bdev.malloc import MallocBdev
from nvmeof.target.block import NVM_IO_COMMAND_EFFECTS, BlockNamespace
from nvmeof.target.namespace import CommandResult
from nvmeof.transport.base import Buffer, Request

pytestmark = pytest.mark.anyio

SPDK = Path(__file__).resolve().parents[3] / "shared" / "spdk"
NSID = 1


class ScriptedChannel:
    """A controller channel whose host data is ``data``; it records what was pulled."""

    trtype = "scripted"
    peer = "test"

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.pulls: list[int] = []

    async def run(self, on_request: Callable[[Request], None]) -> None:
        raise NotImplementedError

    async def pull(self, request: Request, into: memoryview) -> None:
        if len(into) > min(len(self.data), request.command.dptr.length):
            raise CommandError(Status.generic(GenericStatus.DATA_SGL_LENGTH_INVALID))
        into[:] = self.data[: len(into)]
        self.pulls.append(len(into))

    async def complete(
        self, request: Request, completion: Completion, data: Sequence[Buffer] = ()
    ) -> None:
        raise NotImplementedError

    def set_max_in_capsule_data(self, size: int) -> None:
        pass

    async def aclose(self) -> None:
        pass


def make_namespace(num_blocks: int = 64, block_size: int = 512) -> BlockNamespace:
    ns = MallocBdev("Malloc0", num_blocks, block_size).make_namespace()
    ns.nsid = NSID
    return ns


async def run(
    ns: BlockNamespace,
    cmd: Command,
    data: bytes = b"",
    *,
    in_capsule: bool = False,
) -> tuple[CommandResult, ScriptedChannel]:
    channel = ScriptedChannel(data)
    request = Request(cmd, memoryview(bytearray(data)) if in_capsule else None)
    return await ns.execute(request, channel), channel


async def status_of(ns: BlockNamespace, cmd: Command, data: bytes = b"") -> Status:
    with pytest.raises(CommandError) as info:
        await run(ns, cmd, data)
    return info.value.status


async def read(ns: BlockNamespace, lba: int, count: int) -> bytes:
    result, _ = await run(ns, read_command(NSID, lba, count, block_size=ns.block_size))
    return b"".join(bytes(b) for b in result.data)


async def write(ns: BlockNamespace, lba: int, data: bytes, *, fua: bool = False) -> None:
    count = len(data) // ns.block_size
    await run(ns, write_command(NSID, lba, count, block_size=ns.block_size, fua=fua), data)


def blocks(count: int, block_size: int, seed: int = 0) -> bytes:
    return b"".join(bytes([(seed + i) % 251 + 1]) * block_size for i in range(count))


# --------------------------------------------------------------------------------------------------
# Identify
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("block_size", "lbads"), [(512, 9), (4096, 12)])
async def test_identify_namespace(block_size: int, lbads: int) -> None:
    ns = make_namespace(num_blocks=1000, block_size=block_size)
    page = ns.identify_namespace()
    assert len(page) == 4096
    ident = IdentifyNamespace.unpack(page)
    assert (ident.nsze, ident.ncap, ident.nuse) == (1000, 1000, 1000)
    assert ident.nlbaf == 0
    assert ident.flbas == 0
    assert len(ident.lbaf) == 1
    assert (ident.lbaf[0].ms, ident.lbaf[0].lbads) == (0, lbads)
    assert ident.nguid == ns.uuid.bytes
    assert ident.dlfeat & 0x7 == 0x1, "deallocated blocks read as zeros"
    assert ns.csi == 0
    assert ns.identify_csi_namespace() == bytes(4096)
    assert ns.identify_csi_controller() == bytes(4096)


def test_effects_and_features() -> None:
    ns = make_namespace()
    assert ns.io_command_effects() == {0x02: 0x1, 0x01: 0x3, 0x00: 0x1, 0x08: 0x3, 0x09: 0x3}
    assert ns.io_command_effects() is NVM_IO_COMMAND_EFFECTS
    assert ns.get_feature(0x20) is None
    assert ns.set_feature(0x20, 1) is False


def test_namespace_uuid_is_the_bdevs() -> None:
    bdev_uuid = uuid.UUID("d36f4b55-b880-45ce-a878-f8ecb6030635")
    ns = MallocBdev("Malloc0", 8, uuid=bdev_uuid).make_namespace()
    ns.nsid = 3
    assert ns.uuid == bdev_uuid
    assert ns.describe() == {
        "nsid": 3,
        "bdev_name": "Malloc0",
        "name": "Malloc0",
        "nguid": "D36F4B55B88045CEA878F8ECB6030635",
        "uuid": "d36f4b55-b880-45ce-a878-f8ecb6030635",
        "csi": 0,
        "block_size": 512,
        "num_blocks": 8,
    }


# --------------------------------------------------------------------------------------------------
# Read / Write
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [512, 4096])
async def test_write_then_read(block_size: int) -> None:
    ns = make_namespace(block_size=block_size)
    data = blocks(5, block_size, seed=7)
    await write(ns, 10, data)
    assert await read(ns, 10, 5) == data
    assert await read(ns, 12, 1) == data[2 * block_size : 3 * block_size]
    assert await read(ns, 9, 1) == bytes(block_size), "untouched blocks read as zeros"


async def test_read_hands_out_the_bdev_memory() -> None:
    ns = make_namespace()
    await write(ns, 0, blocks(2, 512))
    result, _ = await run(ns, read_command(NSID, 0, 2, block_size=512))
    (view,) = result.data
    assert isinstance(view, memoryview), "malloc reads are views, no copy"
    assert len(view) == 1024


async def test_in_capsule_write_takes_the_capsule_without_a_pull() -> None:
    ns = make_namespace()
    data = blocks(2, 512, seed=3)
    _, channel = await run(ns, write_command(NSID, 4, 2, block_size=512), data, in_capsule=True)
    assert channel.pulls == []
    assert await read(ns, 4, 2) == data


async def test_write_pulls_the_data() -> None:
    ns = make_namespace()
    data = blocks(3, 512, seed=5)
    _, channel = await run(ns, write_command(NSID, 0, 3, block_size=512), data)
    assert channel.pulls == [len(data)]


async def test_last_block_is_in_range() -> None:
    ns = make_namespace(num_blocks=64)
    data = blocks(1, 512)
    await write(ns, 63, data)
    assert await read(ns, 63, 1) == data


@pytest.mark.parametrize(
    "cmd",
    [
        read_command(NSID, 64, 1, block_size=512),
        read_command(NSID, 60, 5, block_size=512),
        read_command(NSID, 1 << 40, 1, block_size=512),
        write_command(NSID, 63, 2, block_size=512),
        write_zeroes_command(NSID, 0, 65),
        write_zeroes_command(NSID, 64, 1, deallocate=True),
    ],
    ids=["read-past-end", "read-straddles", "read-huge-lba", "write", "zeroes", "zeroes-deac"],
)
async def test_lba_out_of_range(cmd: Command) -> None:
    ns = make_namespace(num_blocks=64)
    status = await status_of(ns, cmd, bytes(2 * 512))
    assert (status.sct, status.sc) == (0, GenericStatus.LBA_OUT_OF_RANGE)
    assert status.dnr


@pytest.mark.parametrize("opcode", [NvmOpcode.READ, NvmOpcode.WRITE])
@pytest.mark.parametrize("length", [0, 511, 1023, 1536, 4096])
async def test_data_length_must_match_nlb(opcode: int, length: int) -> None:
    ns = make_namespace()
    cmd = Command(opcode=opcode, nsid=NSID, dptr=SglDescriptor(length=length), cdw12=1)  # 2 LBAs
    status = await status_of(ns, cmd, bytes(length))
    assert (status.sct, status.sc) == (0, GenericStatus.DATA_SGL_LENGTH_INVALID)


async def test_fua_write_flushes() -> None:
    flushes = 0

    class CountingMalloc(MallocBdev):
        async def flush(self) -> None:
            nonlocal flushes
            flushes += 1

    ns = CountingMalloc("Malloc0", 16).make_namespace()
    await write(ns, 0, blocks(1, 512))
    assert flushes == 0
    await write(ns, 1, blocks(1, 512), fua=True)
    assert flushes == 1
    await run(ns, write_zeroes_command(NSID, 0, 1, fua=True))
    assert flushes == 2
    await run(ns, flush_command(NSID))
    assert flushes == 3


# --------------------------------------------------------------------------------------------------
# Write Zeroes and Dataset Management
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deallocate", [False, True])
async def test_write_zeroes(deallocate: bool) -> None:
    ns = make_namespace(block_size=4096)
    data = blocks(8, 4096, seed=1)
    await write(ns, 0, data)
    await run(ns, write_zeroes_command(NSID, 2, 3, deallocate=deallocate))
    got = await read(ns, 0, 8)
    assert got[: 2 * 4096] == data[: 2 * 4096]
    assert got[2 * 4096 : 5 * 4096] == bytes(3 * 4096)
    assert got[5 * 4096 :] == data[5 * 4096 :]


async def test_deallocate_ranges_read_as_zeros() -> None:
    ns = make_namespace(num_blocks=64)
    data = blocks(64, 512, seed=9)
    await write(ns, 0, data)
    ranges = [BlockRange(0, 2), BlockRange(10, 0), BlockRange(40, 24)]
    cmd = deallocate_command(NSID, len(ranges))
    _, channel = await run(ns, cmd, pack_dsm_ranges(ranges))
    assert channel.pulls == [48], "the range list comes from the host"
    got = await read(ns, 0, 64)
    assert got[:1024] == bytes(1024)
    assert got[1024 : 40 * 512] == data[1024 : 40 * 512], "a zero-length range is no range"
    assert got[40 * 512 :] == bytes(24 * 512)


async def test_deallocate_out_of_range_refuses_the_whole_command() -> None:
    ns = make_namespace(num_blocks=64)
    data = blocks(64, 512)
    await write(ns, 0, data)
    ranges = [BlockRange(0, 4), BlockRange(60, 5)]
    status = await status_of(ns, deallocate_command(NSID, 2), pack_dsm_ranges(ranges))
    assert (status.sct, status.sc) == (0, GenericStatus.LBA_OUT_OF_RANGE)
    assert await read(ns, 0, 64) == data, "nothing was deallocated"


async def test_dataset_management_without_deallocate_is_a_hint() -> None:
    ns = make_namespace()
    data = blocks(4, 512)
    await write(ns, 0, data)
    cmd = Command(
        opcode=NvmOpcode.DATASET_MANAGEMENT,
        nsid=NSID,
        dptr=SglDescriptor(length=16),
        cdw11=0x1,  # integral dataset for read: a hint only
    )
    _, channel = await run(ns, cmd, pack_dsm_ranges([BlockRange(0, 4)]))
    assert channel.pulls == []
    assert await read(ns, 0, 4) == data


async def test_dataset_management_short_range_list() -> None:
    ns = make_namespace()
    cmd = deallocate_command(NSID, 3)  # 48 bytes of ranges...
    cmd = cmd.with_dptr(SglDescriptor(length=32))  # ...but the SGL holds 32
    status = await status_of(ns, cmd, bytes(32))
    assert (status.sct, status.sc) == (0, GenericStatus.DATA_SGL_LENGTH_INVALID)


async def test_dsm_range_layout() -> None:
    raw = pack_dsm_ranges([BlockRange(0x1122334455, 7)])
    assert raw == struct.pack("<IIQ", 0, 7, 0x1122334455)


async def test_unknown_opcode() -> None:
    ns = make_namespace()
    status = await status_of(ns, Command(opcode=0x05, nsid=NSID))  # Compare: not served
    assert (status.sct, status.sc) == (0, GenericStatus.INVALID_OPCODE)


async def test_backing_errors_become_media_errors() -> None:
    class FailingMalloc(MallocBdev):
        async def write(self, offset: int, data: Buffer) -> None:
            raise OSError(5, "Input/output error")

        async def read_buffer(self, offset: int, length: int) -> Buffer:
            raise OSError(5, "Input/output error")

    ns = FailingMalloc("Malloc0", 16).make_namespace()
    status = await status_of(ns, write_command(NSID, 0, 1, block_size=512), bytes(512))
    assert (status.sct, status.sc) == (StatusCodeType.MEDIA, 0x80)  # write fault
    status = await status_of(ns, read_command(NSID, 0, 1, block_size=512))
    assert (status.sct, status.sc) == (StatusCodeType.MEDIA, 0x81)  # unrecovered read error


# --------------------------------------------------------------------------------------------------
# Bdevs: SPDK shapes, checks, aio files
# --------------------------------------------------------------------------------------------------
def _spdk(name: str) -> Any:
    path = SPDK / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return json.loads(path.read_text())


def test_malloc_describe_matches_spdk() -> None:
    (spdk,) = _spdk("bdev_get_bdevs.json")
    bdev = MallocBdev("Malloc0", 131072, 512, uuid=uuid.UUID(spdk["uuid"]))
    bdev.make_namespace()  # claims it, as nvmf_subsystem_add_ns does
    ours = bdev.describe()
    assert list(ours) == list(spdk), "same fields, same order"
    for key in ("name", "aliases", "product_name", "block_size", "num_blocks", "uuid"):
        assert ours[key] == spdk[key], key
    for key in ("assigned_rate_limits", "claimed", "claim_type", "zoned", "driver_specific"):
        assert ours[key] == spdk[key], key
    io_types = ours["supported_io_types"]
    assert isinstance(io_types, dict)
    assert list(io_types) == list(spdk["supported_io_types"])
    for io_type in ("read", "write", "unmap", "flush", "write_zeroes"):
        assert io_types[io_type] is True


def test_malloc_config_entry_matches_spdk() -> None:
    config = _spdk("nvmf_tgt-save_config.json")
    assert isinstance(config, dict)
    (bdev_section,) = [s for s in config["subsystems"] if s["subsystem"] == "bdev"]
    (spdk,) = [e for e in bdev_section["config"] if e["method"] == "bdev_malloc_create"]
    params = spdk["params"]
    bdev = MallocBdev(
        params["name"], params["num_blocks"], params["block_size"], uuid.UUID(params["uuid"])
    )
    assert bdev.config_entry() == spdk


def test_unclaimed_bdev_has_no_claim_type() -> None:
    described = MallocBdev("m", 8).describe()
    assert described["claimed"] is False
    assert "claim_type" not in described


@pytest.mark.parametrize("block_size", [0, 256, 520, 1000])
def test_block_size_must_be_a_power_of_two(block_size: int) -> None:
    with pytest.raises(ValueError, match="block size"):
        MallocBdev("m", 8, block_size)


def test_malloc_needs_blocks() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        MallocBdev("m", 0)


async def test_malloc_bdev_api() -> None:
    bdev = MallocBdev("m", 8, 512)
    await bdev.write(512, b"\x07" * 1024)
    out = bytearray(1024)
    await bdev.read(512, memoryview(out))
    assert out == b"\x07" * 1024
    await bdev.unmap(1024, 512)
    await bdev.read(512, memoryview(out))
    assert out == b"\x07" * 512 + bytes(512)
    with pytest.raises(ValueError, match="beyond the end"):
        await bdev.write(4096, bytes(512))
    with pytest.raises(ValueError, match="whole"):
        await bdev.write(100, bytes(512))
    await bdev.aclose()
    with pytest.raises(ValueError, match="closed"):
        await bdev.read(0, memoryview(out))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


@pytest.mark.parametrize("block_size", [512, 4096])
async def test_aio_writes_land_in_the_file(disk: Path, block_size: int) -> None:
    bdev = AioBdev("AIO0", str(disk), block_size)
    try:
        assert bdev.num_blocks == (1 << 20) // block_size
        ns = bdev.make_namespace()
        ns.nsid = NSID
        data = blocks(3, block_size, seed=11)
        await write(ns, 5, data)
        unaligned = bytes(blocks(1, block_size, seed=99))  # in-capsule style: not page aligned
        await run(ns, write_command(NSID, 9, 1, block_size=block_size), unaligned, in_capsule=True)
        await run(ns, flush_command(NSID))
        assert await read(ns, 5, 3) == data
        raw = await anyio.Path(disk).read_bytes()
        assert raw[5 * block_size : 8 * block_size] == data
        assert raw[9 * block_size : 10 * block_size] == unaligned
        await run(ns, write_zeroes_command(NSID, 5, 1))
        await run(ns, deallocate_command(NSID, 1), pack_dsm_ranges([BlockRange(6, 1)]))
        assert await read(ns, 5, 3) == bytes(2 * block_size) + data[2 * block_size :]
        raw = await anyio.Path(disk).read_bytes()
        assert raw[5 * block_size : 7 * block_size] == bytes(2 * block_size)
    finally:
        await bdev.aclose()
    assert (await anyio.Path(disk).stat()).st_size == 1 << 20, "deallocate keeps the file's size"


async def test_aio_read_into_an_unaligned_buffer(disk: Path) -> None:
    await anyio.Path(disk).write_bytes(blocks(2048, 512, seed=4))
    bdev = AioBdev("AIO0", str(disk))
    try:
        backing = bytearray(4096 + 1)
        view = memoryview(backing)[1:]  # never page aligned
        await bdev.read(4096, view)
        assert bytes(view) == (await anyio.Path(disk).read_bytes())[4096:8192]
    finally:
        await bdev.aclose()


async def test_aio_falls_back_to_buffered_io(
    disk: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    caplog.set_level("INFO", logger="nvmeof.target.bdev.aio")
    bdev = AioBdev("AIO0", str(disk))
    try:
        assert bdev.io_mode is IoMode.BUFFERED
        assert "buffered" in caplog.text
        await bdev.write(0, b"\x05" * 512)
        await bdev.flush()
        assert (await anyio.Path(disk).read_bytes())[:512] == b"\x05" * 512
    finally:
        await bdev.aclose()


async def test_aio_describe_and_config(disk: Path) -> None:
    bdev = AioBdev("AIO0", str(disk), 4096, uuid=uuid.UUID(int=7))
    try:
        described = bdev.describe()
        assert described["product_name"] == "AIO disk"
        assert (described["block_size"], described["num_blocks"]) == (4096, 256)
        assert described["driver_specific"] == {
            "aio": {
                "filename": str(disk),
                "block_size_override": True,
                "readonly": False,
                "fallocate": False,
            }
        }
        entry = bdev.config_entry()
        assert entry["method"] == "bdev_aio_create"
        params = entry["params"]
        assert isinstance(params, dict)
        assert (params["name"], params["filename"], params["block_size"]) == (
            "AIO0",
            str(disk),
            4096,
        )
        assert params["uuid"] == str(uuid.UUID(int=7))
    finally:
        await bdev.aclose()


def test_aio_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        AioBdev("AIO0", str(tmp_path / "missing.img"))


@pytest.mark.parametrize("size", [0, 1000, 4096 + 512])
def test_aio_size_must_be_whole_blocks(tmp_path: Path, size: int) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(size))
    with pytest.raises(ValueError, match="multiple of the block size"):
        AioBdev("AIO0", str(path), 4096 if size else 512)
