"""The DRAM tier in front of flash: hits per tier, admission, reinsertion, restart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvext.engine.base import EngineLimits, KeyMissing, KeyValueEngine
from kvext.engine.flash import FlashEngine
from kvext.engine.memory import MemoryEngine
from kvext.engine.tiered import Admission, TieredEngine

pytestmark = pytest.mark.anyio

MAX_VALUE = 16 << 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tiered(path: Path, dram: int, **kw: object) -> TieredEngine:
    flash = FlashEngine.open(
        str(path), max_value_length=MAX_VALUE, size=1 << 20, region_size=64 << 10
    )
    memory = MemoryEngine(EngineLimits(capacity_bytes=dram, max_value_length=MAX_VALUE), "lru")
    return TieredEngine(memory, flash, **kw)  # type: ignore[arg-type]


async def put(engine: TieredEngine, key: bytes, data: bytes) -> None:
    view = engine.allocate(len(data))
    view[:] = data
    await engine.store_async(key, view)


async def test_admission_on_write_serves_from_dram(tmp_path: Path) -> None:
    engine = tiered(tmp_path / "dev", dram=64 << 10, admission=Admission.ON_WRITE)
    assert isinstance(engine, KeyValueEngine)
    await put(engine, b"hot", b"h" * 4000)
    assert bytes(await engine.retrieve_async(b"hot")) == b"h" * 4000
    assert engine.stats.dram_hits == 1
    assert engine.flash.stats.retrieves == 0
    # Push it out of DRAM (not out of flash): the next read comes from flash.
    for i in range(40):
        await put(engine, f"k{i}".encode(), bytes([i]) * 4000)
    assert not engine.dram.exists(b"hot")
    assert bytes(await engine.retrieve_async(b"hot")) == b"h" * 4000
    assert engine.stats.flash_hits == 1
    with pytest.raises(KeyMissing):
        await engine.retrieve_async(b"absent")
    assert engine.stats.flash_misses == 1
    d = engine.describe()
    assert d["dram_hits"] == 1
    assert isinstance(d["flash"], dict)
    assert isinstance(d["dram"], dict)


async def test_admission_on_read(tmp_path: Path) -> None:
    engine = tiered(tmp_path / "dev", dram=64 << 10)
    assert engine.admission is Admission.ON_READ  # the default
    await put(engine, b"k", b"v" * 100)
    assert not engine.dram.exists(b"k")
    assert bytes(await engine.retrieve_async(b"k")) == b"v" * 100
    assert engine.dram.exists(b"k")
    assert bytes(await engine.retrieve_async(b"k")) == b"v" * 100
    assert (engine.stats.flash_hits, engine.stats.dram_hits) == (1, 1)
    await put(engine, b"k", b"w" * 100)  # an overwrite drops the stale DRAM copy
    assert bytes(await engine.retrieve_async(b"k")) == b"w" * 100


async def test_reinsertion_keeps_dram_resident_keys_on_flash(tmp_path: Path) -> None:
    engine = tiered(tmp_path / "dev", dram=64 << 10)
    await put(engine, b"hot", b"h" * 3000)
    rng = random.Random(3)
    written = {b"hot": b"h" * 3000}
    for i in range(400):  # several times the device
        key = f"cold{i}".encode()
        written[key] = rng.randbytes(8000)
        await put(engine, key, written[key])
        assert bytes(await engine.retrieve_async(b"hot")) == b"h" * 3000  # keeps it hot
    assert engine.stats.reinsertions > 0
    assert engine.flash.exists(b"hot")
    for key in engine.list_keys():
        assert bytes(await engine.retrieve_async(key)) == written[key]
    engine.close()
    flash = FlashEngine.open(str(tmp_path / "dev"), max_value_length=MAX_VALUE)
    assert bytes(await flash.retrieve_async(b"hot")) == b"h" * 3000


async def test_delete_and_values_larger_than_dram(tmp_path: Path) -> None:
    engine = tiered(tmp_path / "dev", dram=8 << 10)
    await put(engine, b"big", b"B" * MAX_VALUE)  # larger than DRAM: flash only
    assert not engine.dram.exists(b"big")
    assert bytes(await engine.retrieve_async(b"big")) == b"B" * MAX_VALUE
    await put(engine, b"small", b"s")
    assert await engine.delete_async(b"small")
    assert not engine.exists(b"small")
    with pytest.raises(KeyMissing):
        await engine.retrieve_async(b"small")
    await engine.flush()
