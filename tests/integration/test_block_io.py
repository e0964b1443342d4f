"""Block namespaces end to end: a real target on loopback, the real initiator (REFERENCE 5)."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.errors import NvmeError
from nvmeof.initiator.block import (
    BlockNamespaceClient,
    BlockRange,
    read_command,
)
from nvmeof.initiator.controller import Controller
from nvmeof.spec.features import EFFECTS_LOG_SIZE, LogPageId, get_log_page_command
from nvmeof.spec.identify import (
    Cns,
    IdentifyController,
    NamespaceIdType,
    identify_command,
    unpack_namespace_id_descriptors,
)
from nvmeof.spec.status import GenericStatus
from nvmeof.target.bdev.aio import AioBdev
from nvmeof.target.bdev.base import Bdev
from nvmeof.target.bdev.malloc import MallocBdev
from nvmeof.testing import make_block_target, serve_target, spawn_target

pytestmark = pytest.mark.anyio

TEST_TIMEOUT = 30.0
KV_NSID = 1
BLOCK_NSID = 2


@contextlib.asynccontextmanager
async def connected(
    bdevs: Sequence[Bdev] = (),
    *,
    num_blocks: int = 16384,
    block_size: int = 512,
    io_queues: int = 2,
    queue_depth: int = 32,
    **client_options: object,
) -> AsyncIterator[tuple[Controller, BlockNamespaceClient]]:
    """A KV namespace (nsid 1) and a block namespace (nsid 2) served, and a client on the latter."""
    target = make_block_target(bdevs, num_blocks=num_blocks, block_size=block_size, kv=True)
    with anyio.fail_after(TEST_TIMEOUT):
        async with (
            serve_target(target) as rt,
            Controller.connect(
                rt.address, rt.nqn, io_queues=io_queues, queue_depth=queue_depth, timeout=10.0
            ) as ctrl,
        ):
            client = BlockNamespaceClient(ctrl, **client_options)  # type: ignore[arg-type]
            await client.identify()
            yield ctrl, client


def pattern(size: int, seed: int = 0) -> bytes:
    """Distinct bytes per position, so a misplaced block shows."""
    block = struct.pack("<Q", seed) * (size // 8 + 1)
    counter = b"".join(struct.pack("<I", i) for i in range(size // 4 + 1))
    return bytes(a ^ b for a, b in zip(block[:size], counter[:size], strict=True))


def sc_of(exc: pytest.ExceptionInfo[NvmeError]) -> tuple[int, int]:
    return exc.value.status.sct, exc.value.status.sc


# --------------------------------------------------------------------------------------------------
# Identify
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("block_size", "lbads"), [(512, 9), (4096, 12)])
async def test_identify_namespace(block_size: int, lbads: int) -> None:
    async with connected(num_blocks=3000, block_size=block_size) as (ctrl, client):
        assert client.nsid == BLOCK_NSID, "the KV namespace keeps nsid 1"
        assert ctrl.namespaces[KV_NSID].csi == 1
        assert ctrl.namespaces[BLOCK_NSID].csi == 0
        ident = client.identify_data
        assert ident is not None
        assert (ident.nsze, ident.ncap, ident.nuse) == (3000, 3000, 3000)
        assert (ident.nlbaf, ident.flbas) == (0, 0)
        assert ident.lbaf[0].lbads == lbads
        assert ident.lbaf[0].ms == 0
        assert (client.block_size, client.num_blocks) == (block_size, 3000)
        assert client.capacity == 3000 * block_size
        buf = bytearray(4096)
        await ctrl.admin.execute(
            identify_command(Cns.NAMESPACE_ID_DESCRIPTORS, nsid=BLOCK_NSID),
            into=[memoryview(buf)],
        )
        csi = [
            d.value for d in unpack_namespace_id_descriptors(buf) if d.nidt == NamespaceIdType.CSI
        ]
        assert csi == [b"\x00"]


async def test_controller_advertises_flush_dsm_and_write_zeroes() -> None:
    async with connected() as (ctrl, _):
        buf = bytearray(4096)
        await ctrl.admin.execute(identify_command(Cns.CONTROLLER), into=[memoryview(buf)])
        ident = IdentifyController.unpack(buf)
        assert ident.oncs & 0x4, "Dataset Management"
        assert ident.oncs & 0x8, "Write Zeroes"
        assert ident.vwc & 0x1, "a volatile write cache: hosts send Flush"
        page = bytearray(EFFECTS_LOG_SIZE)
        await ctrl.admin.execute(
            get_log_page_command(LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS, EFFECTS_LOG_SIZE, csi=0),
            into=[memoryview(page)],
        )
        iocs = struct.unpack_from("<256I", page, 1024)
        assert {op: fx for op, fx in enumerate(iocs) if fx} == {
            0x00: 0x1,
            0x01: 0x3,
            0x02: 0x1,
            0x08: 0x3,
            0x09: 0x3,
        }


# --------------------------------------------------------------------------------------------------
# Read and write
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [512, 4096])
async def test_write_read_round_trip(block_size: int) -> None:
    async with connected(block_size=block_size) as (_, client):
        one = pattern(block_size, seed=1)
        await client.write(0, one)
        assert await client.read(0, 1) == one
        # in-capsule sized and R2T sized writes
        for count, lba in ((2, 10), (16, 100), (64, 1000)):
            data = pattern(count * block_size, seed=count)
            await client.write(lba, data)
            assert await client.read(lba, count) == data
        assert await client.read(1, 1) == bytes(block_size), "never written: zeros"
        # into the caller's buffer, a slice of a bigger one
        backing = bytearray(4 * block_size)
        out = memoryview(backing)[block_size : 3 * block_size]
        assert await client.read(10, 2, out=out) is out
        assert backing[block_size : 3 * block_size] == pattern(2 * block_size, seed=2)
        assert backing[:block_size] == bytes(block_size)


async def test_last_block_and_whole_namespace() -> None:
    async with connected(num_blocks=2048, block_size=512) as (_, client):
        data = pattern(2048 * 512, seed=5)
        await client.write(0, data)
        assert await client.read(0, 2048) == data
        await client.write(2047, b"\xee" * 512)
        assert await client.read(2047, 1) == b"\xee" * 512


async def test_many_in_flight_multi_mib() -> None:
    block_size = 4096
    chunk_blocks = 64  # 256 KiB per command
    chunks = 32  # 8 MiB in all, every command in flight at once
    async with connected(num_blocks=4096, block_size=block_size, queue_depth=16) as (
        ctrl,
        client,
    ):
        datas = [pattern(chunk_blocks * block_size, seed=i + 1) for i in range(chunks)]
        async with anyio.create_task_group() as tg:
            for i, data in enumerate(datas):
                tg.start_soon(client.write, i * chunk_blocks, data)
        got: list[bytearray] = [bytearray()] * chunks

        async def read_back(i: int) -> None:
            got[i] = await client.read(i * chunk_blocks, chunk_blocks)

        async with anyio.create_task_group() as tg:
            for i in range(chunks):
                tg.start_soon(read_back, i)
        for i in range(chunks):
            assert got[i] == datas[i], f"chunk {i}"
        assert max(q.peak_in_flight for q in ctrl.io_queues) > 1
        # one 8 MiB read of everything
        whole = await client.read(0, chunks * chunk_blocks)
        assert whole == b"".join(datas)


async def test_large_transfers_are_split() -> None:
    async with connected(num_blocks=16384, block_size=512, max_io_size=256 << 10) as (
        ctrl,
        client,
    ):
        assert client.max_blocks_per_command == 512
        data = pattern(4 << 20, seed=3)  # 16 commands of 256 KiB
        await client.write(100, data)
        assert await client.read(100, len(data) // 512) == data
        assert sum(q.peak_in_flight for q in ctrl.io_queues) > 1


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
async def test_lba_out_of_range() -> None:
    async with connected(num_blocks=1024, block_size=512) as (_, client):
        cases: list[Callable[[], Awaitable[object]]] = [
            lambda: client.read(1024, 1),
            lambda: client.read(1000, 25),
            lambda: client.write(1020, bytes(5 * 512)),
            lambda: client.write_zeroes(1024, 1),
            lambda: client.deallocate([(0, 1), (1023, 2)]),
        ]
        for call in cases:
            with pytest.raises(NvmeError) as info:
                await call()
            assert sc_of(info) == (0, GenericStatus.LBA_OUT_OF_RANGE)
            assert info.value.status.dnr
        # the namespace still works
        await client.write(1023, b"\x01" * 512)
        assert await client.read(1023, 1) == b"\x01" * 512


async def test_length_mismatch_and_wrong_namespace() -> None:
    async with connected(num_blocks=1024, block_size=512) as (ctrl, client):
        # a command whose SGL describes 1 block while NLB says 2
        cmd = read_command(client.nsid, 0, 2, block_size=256)
        completion = await ctrl.execute_io(cmd, into=[memoryview(bytearray(512))], check=False)
        status = completion.status
        assert (status.sct, status.sc) == (0, GenericStatus.DATA_SGL_LENGTH_INVALID)
        # a namespace that is not there
        other = BlockNamespaceClient(ctrl, nsid=9)
        other.identify_data = client.identify_data
        with pytest.raises(NvmeError) as info:
            await other.read(0, 1)
        assert sc_of(info) == (0, GenericStatus.INVALID_NAMESPACE_OR_FORMAT)


async def test_client_argument_checks() -> None:
    async with connected(num_blocks=64, block_size=512) as (_, client):
        with pytest.raises(ValueError, match="whole number"):
            await client.write(0, bytes(100))
        with pytest.raises(ValueError, match="out is"):
            await client.read(0, 2, out=bytearray(512))
        with pytest.raises(ValueError, match="at least 1"):
            await client.read(0, 0)
        with pytest.raises(TypeError, match="read-only"):
            await client.read(0, 1, out=bytes(512))


# --------------------------------------------------------------------------------------------------
# Write Zeroes, deallocate, flush
# --------------------------------------------------------------------------------------------------
async def test_write_zeroes_and_deallocate() -> None:
    async with connected(num_blocks=4096, block_size=512) as (_, client):
        data = pattern(512 * 512, seed=8)
        await client.write(0, data)
        await client.write_zeroes(10, 20)
        await client.write_zeroes(40, 2, deallocate=True)
        await client.deallocate([(100, 50), BlockRange(300, 12)])
        got = await client.read(0, 512)
        expect = bytearray(data)
        for lba, count in ((10, 20), (40, 2), (100, 50), (300, 12)):
            expect[lba * 512 : (lba + count) * 512] = bytes(count * 512)
        assert got == expect


async def test_deallocate_many_ranges() -> None:
    async with connected(num_blocks=4096, block_size=512) as (_, client):
        data = pattern(4096 * 512, seed=2)
        await client.write(0, data)
        ranges = [(lba, 1) for lba in range(0, 4096, 8)]  # 512 ranges: two DSM commands
        await client.deallocate(ranges)
        got = await client.read(0, 4096)
        for lba in range(4096):
            block = got[lba * 512 : (lba + 1) * 512]
            expect = bytes(512) if lba % 8 == 0 else data[lba * 512 : (lba + 1) * 512]
            assert block == expect, f"LBA {lba}"


async def test_write_zeroes_beyond_one_command() -> None:
    num_blocks = 70000  # more than one Write Zeroes carries (65536)
    async with connected(num_blocks=num_blocks, block_size=512) as (_, client):
        await client.write(0, b"\xaa" * 512)
        await client.write(num_blocks - 1, b"\xbb" * 512)
        await client.write_zeroes(0, num_blocks)
        assert await client.read(0, 1) == bytes(512)
        assert await client.read(num_blocks - 1, 1) == bytes(512)


async def test_flush_and_fua() -> None:
    async with connected(block_size=4096) as (_, client):
        await client.write(3, pattern(4096), fua=True)
        await client.flush()
        assert await client.read(3, 1) == pattern(4096)


# --------------------------------------------------------------------------------------------------
# aio bdevs: data lands in the file
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [512, 4096])
async def test_aio_bdev_persists_to_the_file(tmp_path: Path, block_size: int) -> None:
    path = anyio.Path(tmp_path / "disk.img")
    await path.write_bytes(bytes(4 << 20))
    bdev = AioBdev("AIO0", str(path), block_size)
    data = pattern(64 * block_size, seed=4)
    try:
        async with connected([bdev]) as (_, client):
            assert client.num_blocks == (4 << 20) // block_size
            assert client.block_size == block_size
            await client.write(7, data)
            await client.flush()
            assert await client.read(7, 64) == data
            await client.deallocate([(7, 1)])
            await client.write_zeroes(8, 1)
            assert await client.read(7, 2) == bytes(2 * block_size)
    finally:
        await bdev.aclose()
    raw = await path.read_bytes()
    assert len(raw) == 4 << 20
    start = 7 * block_size
    assert raw[start : start + 2 * block_size] == bytes(2 * block_size)
    assert raw[start + 2 * block_size : start + 64 * block_size] == data[2 * block_size :]
    # a new bdev on the same file serves the same blocks
    again = AioBdev("AIO1", str(path), block_size)
    try:
        async with connected([again]) as (_, client):
            assert await client.read(9, 62) == data[2 * block_size :]
    finally:
        await again.aclose()


async def test_malloc_and_aio_side_by_side_with_kv(tmp_path: Path) -> None:
    path = anyio.Path(tmp_path / "disk.img")
    await path.write_bytes(bytes(1 << 20))
    aio = AioBdev("AIO0", str(path), 4096)
    try:
        async with connected([MallocBdev("Malloc0", 256, 512), aio]) as (ctrl, malloc):
            assert sorted(ctrl.namespaces) == [1, 2, 3]
            on_file = BlockNamespaceClient(ctrl, nsid=3)
            await on_file.identify()
            assert (malloc.block_size, on_file.block_size) == (512, 4096)
            await malloc.write(0, b"\x01" * 512)
            await on_file.write(0, b"\x02" * 4096)
            assert await malloc.read(0, 1) == b"\x01" * 512
            assert await on_file.read(0, 1) == b"\x02" * 4096
            kv = KVClient(ctrl)
            assert kv.nsid == KV_NSID
            await kv.put(b"key", b"value")
            assert await kv.get(b"key") == b"value"
    finally:
        await aio.aclose()


# --------------------------------------------------------------------------------------------------
# The command line: gpucache target --malloc / --aio / --block-size
# --------------------------------------------------------------------------------------------------
def test_cli_block_namespaces(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    args = ("--capacity", "16MiB", "--malloc", "4MiB", "--aio", str(disk), "--block-size", "4096")
    with spawn_target(*args) as rt:

        async def exercise() -> None:
            with anyio.fail_after(TEST_TIMEOUT):
                async with Controller.connect(rt.address, rt.nqn) as ctrl:
                    assert {n: i.csi for n, i in ctrl.namespaces.items()} == {1: 1, 2: 0, 3: 0}
                    malloc = BlockNamespaceClient(ctrl, nsid=2)
                    aio = BlockNamespaceClient(ctrl, nsid=3)
                    await malloc.identify()
                    await aio.identify()
                    assert (malloc.num_blocks, malloc.block_size) == (1024, 4096)
                    assert (aio.num_blocks, aio.block_size) == (256, 4096)
                    await aio.write(1, b"\x42" * 4096)
                    await aio.flush()
                async with BlockNamespaceClient.connect(rt.address, rt.nqn) as first:
                    assert (first.nsid, first.num_blocks) == (2, 1024), "the first NVM namespace"
                    assert await first.read(0, 1) == bytes(4096)

        anyio.run(exercise)
        assert disk.read_bytes()[4096:8192] == b"\x42" * 4096


def test_cli_refuses_a_missing_aio_file(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="did not start"),
        spawn_target("--aio", os.fspath(tmp_path / "missing.img"), startup_timeout=20),
    ):
        pass
