"""Registration of caller buffers: numpy and torch CPU buffers registered once, CUDA tensors by
dma-buf or a pinned staging buffer, and a clear message where pyverbs or a device is missing."""

from __future__ import annotations

import pytest

from nvmeof.errors import ConnectionLost
from nvmeof.transport.mr_cache import CudaRegistrar, MrCache, buffer_address
from nvmeof.transport.verbs import Access, MemoryRegion, RdmaUnavailable, RegistrationError

from .conftest import make_rdma

RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ


class Registrar:
    def __init__(self) -> None:
        self.rdma = make_rdma()
        self.ctx, self.pd = self.rdma.device("h0")
        self.calls = 0

    def __call__(self, buffer: memoryview, access: Access) -> MemoryRegion:
        from simulator.rdma import SimEndpoint

        self.calls += 1
        endpoint = SimEndpoint(self.rdma, "h0", "t0", send_depth=1, recv_depth=1)
        return endpoint.register(buffer, access)


def test_views_of_one_buffer_share_a_registration() -> None:
    register = Registrar()
    cache = MrCache(register)
    buf = bytearray(1 << 16)
    a = cache.lookup(memoryview(buf)[100:200], RW)
    b = cache.lookup(buf, RW)
    assert register.calls == 1
    assert a.mr is b.mr
    assert (a.offset, a.length) == (100, 100)
    assert buffer_address(memoryview(buf)[100:]) == buffer_address(buf) + 100


def test_numpy_and_torch_cpu_buffers_are_registered_once() -> None:
    np = pytest.importorskip("numpy")
    register = Registrar()
    cache = MrCache(register)
    arr = np.zeros((64, 64), dtype=np.float32)
    for _ in range(3):
        cache.lookup(memoryview(arr.reshape(-1).view(np.uint8)), RW)
    assert register.calls == 1
    torch = pytest.importorskip("torch")
    tensor = torch.zeros(1024, dtype=torch.float16)
    for _ in range(3):
        cache.lookup(memoryview(tensor.view(torch.uint8).numpy()), RW)
    assert register.calls == 2
    assert cache.hits == 4


def test_read_only_buffers_register_for_remote_read_only() -> None:
    cache = MrCache(Registrar())
    data = b"constant" * 1000
    sge = cache.lookup(data, Access.REMOTE_READ)
    assert sge.length == len(data)
    with pytest.raises(RegistrationError):
        cache.lookup(data, Access.REMOTE_WRITE)


def test_lru_eviction_deregisters() -> None:
    register = Registrar()
    cache = MrCache(register, max_entries=2)
    bufs = [bytearray(4096) for _ in range(3)]
    first = cache.lookup(bufs[0], RW).mr
    cache.lookup(bufs[1], RW)
    cache.lookup(bufs[2], RW)
    assert len(cache) == 2
    assert getattr(first, "closed", False)  # the oldest region was deregistered
    cache.forget(bufs[2])
    assert len(cache) == 1
    cache.close()
    assert len(cache) == 0


def test_cuda_tensor_registration() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(
            "hardware: no CUDA device here (CUDA tensors need a GPU; dma-buf needs one too)"
        )
    cache = MrCache(Registrar())
    registrar = CudaRegistrar(cache)  # the simulator has no dma-buf: the pinned staging path
    tensor = torch.arange(4096, dtype=torch.float32, device="cuda")
    region = registrar.region(tensor, RW)
    assert not region.direct
    region.stage_out()
    assert bytes(region.staging.numpy()[:8]) == bytes(tensor[:2].cpu().numpy())
    assert registrar.region(tensor, RW) is region  # registered once
    tensor.zero_()
    region.stage_in()
    assert float(tensor[1]) == 1.0


def test_pyverbs_backend_says_what_is_missing() -> None:
    from nvmeof.transport import pyverbs_backend

    if not _has_device(pyverbs_backend):
        with pytest.raises(RdmaUnavailable, match="apt-get install python3-pyverbs"):
            pyverbs_backend.PyverbsConnector()
        return
    connector = pyverbs_backend.PyverbsConnector()
    # pyverbs and a device are present: connecting nowhere fails cleanly
    import anyio

    async def main() -> None:
        with pytest.raises(ConnectionLost):
            await connector("127.0.0.1", 1, bytes(32), send_depth=4, recv_depth=4)

    anyio.run(main)


def _has_device(backend: object) -> bool:
    try:
        return bool(backend.rdma_devices())  # type: ignore[attr-defined]
    except RdmaUnavailable:
        return False
