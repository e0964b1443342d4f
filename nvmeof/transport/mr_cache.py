"""Registration of caller buffers for RDMA, with a cache so a buffer reused across puts and gets
is registered once.

The cache registers the whole memory of a buffer's exporter (the bytearray, numpy array or torch
CPU tensor behind a ``memoryview``), so any view into it hits the same region; it holds a
reference to the exporter for as long as the region lives, so the memory cannot be freed (and its
address reused by another object) under a registration. It is bounded by bytes and entries and
evicts the least recently used region.

CUDA tensors: ``CudaRegistrar`` registers device memory through dma-buf (``cuMemGetHandleForAddress
Range``) where the GPU, driver and backend allow it, else stages through a pinned host buffer.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import sys
from collections.abc import Callable
from typing import Any

import attrs

from nvmeof.transport.verbs import Access, MemoryRegion, RegistrationError, Sge

log = logging.getLogger("nvmeof.transport.mr_cache")

Buffer = bytes | bytearray | memoryview


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def buffer_address(buffer: Buffer) -> int:
    """The address of a contiguous buffer's first byte (read-only buffers too)."""
    view = memoryview(buffer)
    if not view.contiguous:
        raise RegistrationError("only contiguous buffers can be registered")
    info = _PyBuffer()
    if _get_buffer(view, ctypes.byref(info), 0) != 0:  # PyBUF_SIMPLE
        raise RegistrationError("the buffer protocol refused this buffer")
    try:
        return int(info.buf or 0)
    finally:
        _release_buffer(ctypes.byref(info))


def _flat(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:
        raise RegistrationError("only C-contiguous buffers can be registered")
    return view.cast("B")


@attrs.define(eq=False)
class _Entry:
    owner: object  # keeps the exporter's memory alive while registered
    base: int
    length: int
    access: Access
    mr: MemoryRegion


Register = Callable[[memoryview, Access], MemoryRegion]


class MrCache:
    """Memory regions over caller buffers, registered once each, least recently used evicted."""

    def __init__(
        self, register: Register, *, max_bytes: int = 4 << 30, max_entries: int = 4096
    ) -> None:
        self._register = register
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self.registered_bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, buffer: Buffer, access: Access) -> Sge:
        """The registered bytes of ``buffer`` (registering its exporter's memory on a miss)."""
        view = _flat(buffer)
        if view.readonly and access & (Access.LOCAL_WRITE | Access.REMOTE_WRITE):
            raise RegistrationError("a read-only buffer cannot receive data")
        addr = buffer_address(view)
        owner = _owner(view)
        root = _root_view(owner, view)
        base = buffer_address(root)
        entry = self._entries.get(base)
        # While an entry holds its owner, no other object can live at its addresses: an entry
        # covering these bytes is this buffer's memory, whichever view of it we were given.
        if (
            entry is not None
            and entry.access & access == access
            and base <= addr
            and addr + len(view) <= base + entry.length
        ):
            self._entries.move_to_end(base)
            self.hits += 1
            return Sge(entry.mr, addr - base, len(view))
        if entry is not None:
            self._drop(base)
        self.misses += 1
        want = access | (entry.access if entry is not None else 0)
        if root.readonly:
            want &= ~(Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        mr = self._register(root, Access(want))
        self._entries[base] = _Entry(owner, base, len(root), Access(want), mr)
        self.registered_bytes += len(root)
        self._evict()
        return Sge(mr, addr - base, len(view))

    def forget(self, buffer: Buffer) -> None:
        """Deregister ``buffer``'s region now (a peer may no longer reach it)."""
        view = _flat(buffer)
        base = buffer_address(_root_view(_owner(view), view))
        if base in self._entries:
            self._drop(base)

    def _evict(self) -> None:
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_entries or self.registered_bytes > self.max_bytes
        ):
            self._drop(next(iter(self._entries)))

    def _drop(self, base: int) -> None:
        entry = self._entries.pop(base)
        self.registered_bytes -= entry.length
        try:
            entry.mr.close()
        except Exception:  # deregistration failing must not break the data path
            log.exception("deregistering a memory region failed")

    def close(self) -> None:
        for base in list(self._entries):
            self._drop(base)


def _owner(view: memoryview) -> object:
    """The object that owns the memory: the exporter, followed down numpy's ``base`` chain (so
    every ``arr.reshape(-1).view(uint8)`` of one array finds the same owner)."""
    owner: object = view.obj if view.obj is not None else view
    while (base := getattr(owner, "base", None)) is not None and base is not owner:
        owner = base
    return owner


def _root_view(owner: object, view: memoryview) -> memoryview:
    """The whole contiguous memory of the exporter, or the view itself where that is unknown."""
    if owner is view:
        return view
    try:
        root = memoryview(owner)  # type: ignore[arg-type]
    except TypeError:
        return view
    if not root.c_contiguous:
        return view
    return root if root.ndim == 1 and root.format == "B" else root.cast("B")


# --- CUDA tensors ------------------------------------------------------------------------------
CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD = 1


def cuda_dmabuf_fd(address: int, size: int) -> int:
    """A dma-buf file descriptor for CUDA device memory (driver API
    ``cuMemGetHandleForAddressRange``; CUDA 11.7+, and a GPU and kernel driver that export
    dma-buf). Raises ``RegistrationError`` where that is not available."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RegistrationError(f"no CUDA driver library: {exc}") from None
    fn = getattr(cuda, "cuMemGetHandleForAddressRange", None)
    if fn is None:
        raise RegistrationError("the CUDA driver has no cuMemGetHandleForAddressRange (< 11.7)")
    fd = ctypes.c_int(-1)
    fn.argtypes = [
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_uint64,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_ulonglong,
    ]
    rc = fn(ctypes.byref(fd), address, size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0)
    if rc != 0 or fd.value < 0:
        raise RegistrationError(f"cuMemGetHandleForAddressRange failed (CUresult {rc})")
    return fd.value


DmabufRegister = Callable[[int, int, int, int, Access], MemoryRegion]


@attrs.define(eq=False)
class TensorRegion:
    """A CUDA tensor's bytes, registered: directly (dma-buf) or through a pinned staging copy.

    For a put, call ``stage_out()`` before posting; for a get, ``stage_in()`` after the data has
    landed. Both do nothing when the tensor is registered directly.
    """

    tensor: Any
    sge: Sge
    staging: Any = None  # the pinned host tensor, when staged

    @property
    def direct(self) -> bool:
        return self.staging is None

    def stage_out(self) -> None:
        if self.staging is not None:
            self.staging.copy_(self.tensor.reshape(-1).view(self.staging.dtype))

    def stage_in(self) -> None:
        if self.staging is not None:
            self.tensor.reshape(-1).view(self.staging.dtype).copy_(self.staging)


class CudaRegistrar:
    """Registers CUDA tensors: dma-buf where possible, else a pinned staging buffer (cached per
    tensor, so a tensor reused across puts is registered once)."""

    def __init__(self, cache: MrCache, register_dmabuf: DmabufRegister | None = None) -> None:
        self.cache = cache
        self.register_dmabuf = register_dmabuf
        self.dmabuf_error: str | None = None if register_dmabuf else "backend has no dma-buf"
        self._regions: dict[int, TensorRegion] = {}

    def region(self, tensor: Any, access: Access) -> TensorRegion:
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
            raise TypeError("CudaRegistrar takes CUDA tensors")
        if not tensor.is_contiguous():
            raise ValueError("the tensor is not contiguous; pass tensor.contiguous()")
        key = tensor.data_ptr()
        found = self._regions.get(key)
        if found is not None and found.tensor is tensor:
            return found
        size = tensor.numel() * tensor.element_size()
        region: TensorRegion | None = None
        if self.register_dmabuf is not None and self.dmabuf_error is None:
            try:
                fd = cuda_dmabuf_fd(tensor.data_ptr(), size)
                mr = self.register_dmabuf(fd, 0, size, tensor.data_ptr(), access)
                region = TensorRegion(tensor, Sge(mr, 0, size))
            except RegistrationError as exc:
                self.dmabuf_error = str(exc)
                log.info("CUDA memory cannot be registered directly (%s): staging", exc)
        if region is None:
            staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            sge = self.cache.lookup(memoryview(staging.numpy()), access)
            region = TensorRegion(tensor, sge, staging)
        self._regions[key] = region
        return region
