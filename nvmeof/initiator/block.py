"""The host side of a block namespace (NVM command set, CSI 0): read and write LBAs.

``BlockNamespaceClient(controller)`` finds the controller's first NVM namespace; the first call
reads Identify Namespace (CNS 0) for the block size and count. Transfers larger than one command
may carry (NLB is 16 bits; MDTS caps the bytes) are split and the pieces sent concurrently, spread
over the I/O queues. Error completions raise ``NvmeError`` with the status.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, overload

import anyio
import attrs

from nvmeof.errors import NvmeError, NvmeofError
from nvmeof.initiator.controller import Controller
from nvmeof.spec.command import Command, NvmOpcode
from nvmeof.spec.completion import Completion
from nvmeof.spec.identify import Cns, IdentifyNamespace, identify_command
from nvmeof.spec.sgl import SglDescriptor
from nvmeof.transport.base import Buffer

NVM_CSI = 0
MAX_BLOCKS_PER_COMMAND = 1 << 16  # NLB is a 0's based 16-bit field
MAX_DSM_RANGES = 256
MAX_DSM_RANGE_BLOCKS = 0xFFFFFFFF
_DSM_RANGE = struct.Struct("<IIQ")
_FUA = 1 << 30
_DEAC = 1 << 25
_DSM_DEALLOCATE = 1 << 2

_Out = TypeVar("_Out")
_Piece = Callable[[int, int, memoryview], Awaitable[None]]


# --- commands -----------------------------------------------------------------------------------
def _rw(opcode: int, nsid: int, slba: int, nlb: int, cdw12: int, length: int) -> Command:
    if not 1 <= nlb <= MAX_BLOCKS_PER_COMMAND:
        raise ValueError(f"{nlb} blocks: one command carries 1..{MAX_BLOCKS_PER_COMMAND}")
    if not 0 <= slba < 1 << 64:
        raise ValueError(f"LBA {slba} is not a 64-bit LBA")
    return Command(
        opcode=opcode,
        nsid=nsid,
        dptr=SglDescriptor(length=length),
        cdw10=slba & 0xFFFFFFFF,
        cdw11=slba >> 32,
        cdw12=(nlb - 1) | cdw12,
    )


def read_command(nsid: int, slba: int, nlb: int, *, block_size: int, fua: bool = False) -> Command:
    return _rw(NvmOpcode.READ, nsid, slba, nlb, _FUA if fua else 0, nlb * block_size)


def write_command(nsid: int, slba: int, nlb: int, *, block_size: int, fua: bool = False) -> Command:
    return _rw(NvmOpcode.WRITE, nsid, slba, nlb, _FUA if fua else 0, nlb * block_size)


def write_zeroes_command(
    nsid: int, slba: int, nlb: int, *, deallocate: bool = False, fua: bool = False
) -> Command:
    flags = (_DEAC if deallocate else 0) | (_FUA if fua else 0)
    return _rw(NvmOpcode.WRITE_ZEROES, nsid, slba, nlb, flags, 0)


def flush_command(nsid: int) -> Command:
    return Command(opcode=NvmOpcode.FLUSH, nsid=nsid)


@attrs.frozen
class BlockRange:
    """``count`` blocks from ``lba`` (a Dataset Management range)."""

    lba: int
    count: int


def pack_dsm_ranges(ranges: Sequence[BlockRange]) -> bytes:
    """Dataset Management range list: 16 bytes each (attributes, 1-based length, SLBA)."""
    buf = bytearray(len(ranges) * _DSM_RANGE.size)
    for i, rng in enumerate(ranges):
        _DSM_RANGE.pack_into(buf, i * _DSM_RANGE.size, 0, rng.count, rng.lba)
    return bytes(buf)


def deallocate_command(nsid: int, ranges: int) -> Command:
    if not 1 <= ranges <= MAX_DSM_RANGES:
        raise ValueError(f"{ranges} ranges: one command carries 1..{MAX_DSM_RANGES}")
    return Command(
        opcode=NvmOpcode.DATASET_MANAGEMENT,
        nsid=nsid,
        dptr=SglDescriptor(length=ranges * _DSM_RANGE.size),
        cdw10=ranges - 1,
        cdw11=_DSM_DEALLOCATE,
    )


def _byte_view(buf: object, *, writable: bool) -> memoryview:
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{type(buf).__name__} does not export the buffer protocol") from None
    if not view.c_contiguous:
        raise ValueError("the buffer must be C-contiguous")
    if writable and view.readonly:
        raise TypeError(f"{type(buf).__name__} is read-only; pass a writable buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def block_size_of(ident: IdentifyNamespace) -> int:
    """The LBA size of the format FLBAS selects (bits 3:0, high bits 6:5)."""
    index = (ident.flbas & 0xF) | ((ident.flbas >> 5) & 0x3) << 4
    if index >= len(ident.lbaf):
        raise NvmeofError(f"FLBAS selects LBA format {index}; NLBAF lists {len(ident.lbaf)}")
    return 1 << ident.lbaf[index].lbads


# --- the client ---------------------------------------------------------------------------------
class BlockNamespaceClient:
    """Block I/O on one NVM namespace of a connected controller."""

    def __init__(
        self,
        controller: Controller,
        nsid: int | None = None,
        *,
        timeout: float | None = 30.0,
        max_io_size: int | None = None,
    ) -> None:
        if nsid is None:
            nvm = [n for n, info in sorted(controller.namespaces.items()) if info.csi == NVM_CSI]
            if not nvm:
                raise NvmeofError(f"{controller.options.subnqn} has no NVM (block) namespace")
            nsid = nvm[0]
        else:
            info = controller.namespaces.get(nsid)
            if info is not None and info.csi != NVM_CSI:
                raise NvmeofError(f"namespace {nsid} is CSI {info.csi}, not an NVM namespace")
        self.controller = controller
        self.nsid = nsid
        self.timeout = timeout
        self.max_io_size = max_io_size
        self.identify_data: IdentifyNamespace | None = None
        self._block_size = 0
        self._num_blocks = 0
        self._max_blocks = MAX_BLOCKS_PER_COMMAND

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        address: str | tuple[str, int],
        subnqn: str,
        *,
        nsid: int | None = None,
        **options: Any,
    ) -> AsyncIterator[BlockNamespaceClient]:
        """Connect a controller (keep alive running) and give a client on its NVM namespace."""
        async with Controller.connect(address, subnqn, **options) as controller:
            client = cls(controller, nsid)
            await client.identify()
            yield client

    # --- geometry -----------------------------------------------------------------------------
    async def identify(self) -> IdentifyNamespace:
        """Read Identify Namespace (again): block size, block count, and the rest."""
        buf = bytearray(4096)
        await self.controller.admin.execute(
            identify_command(Cns.NAMESPACE, nsid=self.nsid),
            into=[memoryview(buf)],
            timeout=self.timeout,
        )
        ident = IdentifyNamespace.unpack(buf)
        if ident.ncap == 0:
            raise NvmeofError(f"namespace {self.nsid} is not active (NCAP 0)")
        block_size = block_size_of(ident)
        limit = MAX_BLOCKS_PER_COMMAND
        mdts = self.controller.identify.mdts if self.controller.identify else 0
        if mdts:
            limit = min(limit, max(1, (4096 << mdts) // block_size))
        if self.max_io_size:
            limit = min(limit, max(1, self.max_io_size // block_size))
        self.identify_data = ident
        self._block_size = block_size
        self._num_blocks = ident.nsze
        self._max_blocks = limit
        return ident

    async def _ready(self) -> int:
        if self.identify_data is None:
            await self.identify()
        return self._block_size

    @property
    def block_size(self) -> int:
        self._require_identified()
        return self._block_size

    @property
    def num_blocks(self) -> int:
        self._require_identified()
        return self._num_blocks

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_blocks_per_command(self) -> int:
        self._require_identified()
        return self._max_blocks

    def _require_identified(self) -> None:
        if self.identify_data is None:
            raise NvmeofError("call `await client.identify()` first (or any I/O method)")

    # --- I/O ----------------------------------------------------------------------------------
    @overload
    async def read(self, lba: int, count: int, out: None = None) -> bytearray: ...

    @overload
    async def read(self, lba: int, count: int, out: _Out) -> _Out: ...

    async def read(self, lba: int, count: int, out: object = None) -> object:
        """``count`` blocks from ``lba``, landing in ``out`` (returned) or a new bytearray."""
        bs = await self._ready()
        _check_count(count)
        result: object
        if out is None:
            result = bytearray(count * bs)
            view = memoryview(result)
        else:
            result = out
            view = _byte_view(out, writable=True)
            if len(view) != count * bs:
                raise ValueError(f"out is {len(view)} bytes; {count} blocks are {count * bs}")

        async def piece(slba: int, nlb: int, dest: memoryview) -> None:
            cmd = read_command(self.nsid, slba, nlb, block_size=bs)
            await self._execute(cmd, f"read of {nlb} blocks at LBA {slba}", into=[dest])

        await self._split(lba, count, bs, view, piece)
        return result

    async def write(self, lba: int, buffer: object, *, fua: bool = False) -> None:
        """Write ``buffer`` (whole blocks of any bytes-like object) from ``lba`` on."""
        bs = await self._ready()
        view = _byte_view(buffer, writable=False)
        if not view or len(view) % bs:
            raise ValueError(f"{len(view)} bytes is not a whole number of {bs}-byte blocks")
        count = len(view) // bs

        async def piece(slba: int, nlb: int, src: memoryview) -> None:
            cmd = write_command(self.nsid, slba, nlb, block_size=bs, fua=fua)
            await self._execute(cmd, f"write of {nlb} blocks at LBA {slba}", out=[src])

        await self._split(lba, count, bs, view, piece)

    async def flush(self) -> None:
        """Make everything written so far durable (the bdev's cache, the file's page cache)."""
        await self._execute(flush_command(self.nsid), "flush")

    async def write_zeroes(
        self, lba: int, count: int, *, deallocate: bool = False, fua: bool = False
    ) -> None:
        """Zero ``count`` blocks from ``lba`` (no data moves)."""
        await self._ready()
        _check_count(count)
        calls = []
        for slba, nlb in _pieces(lba, count, MAX_BLOCKS_PER_COMMAND):
            cmd = write_zeroes_command(self.nsid, slba, nlb, deallocate=deallocate, fua=fua)
            what = f"write zeroes of {nlb} blocks at LBA {slba}"
            calls.append(functools.partial(self._execute, cmd, what))
        await _run_all(calls)

    async def deallocate(self, ranges: Iterable[tuple[int, int] | BlockRange]) -> None:
        """Deallocate (trim) ``(lba, count)`` ranges; they read as zeros afterwards."""
        flat: list[BlockRange] = []
        for item in ranges:
            rng = item if isinstance(item, BlockRange) else BlockRange(*item)
            _check_count(rng.count)
            flat.extend(BlockRange(s, n) for s, n in _pieces(rng.lba, rng.count, 0xFFFFFFFF))
        if not flat:
            return
        await _run_all(
            [
                functools.partial(self._deallocate, flat[i : i + MAX_DSM_RANGES])
                for i in range(0, len(flat), MAX_DSM_RANGES)
            ]
        )

    async def _deallocate(self, batch: Sequence[BlockRange]) -> None:
        await self._execute(
            deallocate_command(self.nsid, len(batch)),
            f"deallocate of {len(batch)} ranges",
            out=[pack_dsm_ranges(batch)],
        )

    # --- plumbing -----------------------------------------------------------------------------
    async def _split(self, lba: int, count: int, bs: int, view: memoryview, piece: _Piece) -> None:
        calls = []
        for slba, nlb in _pieces(lba, count, self._max_blocks):
            start = (slba - lba) * bs
            calls.append(functools.partial(piece, slba, nlb, view[start : start + nlb * bs]))
        await _run_all(calls)

    async def _execute(
        self,
        command: Command,
        what: str,
        *,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
    ) -> Completion:
        completion = await self.controller.execute_io(
            command, out=out, into=into, timeout=self.timeout, check=False
        )
        if not completion.status.success:
            raise NvmeError(completion.status, f"{what} on namespace {self.nsid}")
        return completion


async def _run_all(calls: Sequence[Callable[[], Awaitable[object]]]) -> None:
    """Run the pieces of one request concurrently; all of them finish before an error is raised
    (so no piece is still moving data into the caller's buffer), then the first error is."""
    if len(calls) == 1:
        await calls[0]()
        return
    errors: list[NvmeofError] = []

    async def guarded(call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except NvmeofError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(guarded, call)
    if errors:
        raise errors[0]


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"block count must be at least 1, not {count}")


def _pieces(lba: int, count: int, limit: int) -> Iterable[tuple[int, int]]:
    end = lba + count
    while lba < end:
        n = min(limit, end - lba)
        yield lba, n
        lba += n
