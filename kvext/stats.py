"""Per-namespace KV statistics, split per tier: what ``bdev_kv_get_stats`` answers and
``gpucache stats`` prints.

A DRAM engine has one tier (``dram``), a flash engine one (``flash``); a tiered engine has both
plus ``total``, the engine as its clients see it: a hit is a Retrieve answered from either tier, a
miss one answered from neither, an eviction a key gone from both. In the ``dram`` row of a tiered
engine a miss is a Retrieve that went on to flash, and bytes in are values admitted to DRAM; in
its ``flash`` row bytes in include the hot values written back when their region was recycled.
``crc_dropped`` (records dropped because their CRC failed, at start-up or on read) is null for a
tier that has no records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from kvext.engine.base import EngineStats, KeyValueEngine
from kvext.engine.flash import FlashEngine
from kvext.engine.memory import MemoryEngine
from kvext.engine.tiered import TieredEngine
from nvmeof.units import format_size


@attrs.frozen(kw_only=True)
class TierStats:
    tier: str
    hits: int
    misses: int
    evictions: int
    bytes_in: int
    bytes_out: int
    used_bytes: int
    capacity_bytes: int
    crc_dropped: int | None = None

    @property
    def hit_ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None

    def to_json(self) -> dict[str, object]:
        return {**attrs.asdict(self), "hit_ratio": self.hit_ratio}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> TierStats:
        fields = attrs.fields_dict(cls)
        return cls(**{k: v for k, v in data.items() if k in fields})  # type: ignore[arg-type]


def _tier(
    tier: str,
    stats: EngineStats,
    engine: KeyValueEngine,
    *,
    hits: int | None = None,
    misses: int | None = None,
    crc_dropped: int | None = None,
) -> TierStats:
    return TierStats(
        tier=tier,
        hits=stats.hits if hits is None else hits,
        misses=stats.misses if misses is None else misses,
        evictions=stats.evictions,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
        used_bytes=engine.used_bytes,
        capacity_bytes=engine.limits.capacity_bytes,
        crc_dropped=crc_dropped,
    )


def tier_stats(engine: KeyValueEngine) -> list[TierStats]:
    """The engine's counters, one entry per tier (see the module doc)."""
    if isinstance(engine, TieredEngine):
        s = engine.stats
        crc = engine.flash.stats.crc_dropped
        return [
            _tier("dram", engine.dram.stats, engine.dram, hits=s.dram_hits, misses=s.dram_misses),
            _tier(
                "flash",
                engine.flash.stats,
                engine.flash,
                hits=s.flash_hits,
                misses=s.flash_misses,
                crc_dropped=crc,
            ),
            _tier("total", s, engine, crc_dropped=crc),
        ]
    if isinstance(engine, FlashEngine):
        return [_tier("flash", engine.stats, engine, crc_dropped=engine.stats.crc_dropped)]
    if isinstance(engine, MemoryEngine):
        return [_tier("dram", engine.stats, engine)]
    return [_tier("engine", engine.stats, engine)]


def namespace_stats(
    engine: KeyValueEngine,
    *,
    name: str,
    nqn: str | None,
    nsid: int | None,
    bdev_name: str | None,
) -> dict[str, object]:
    """One ``bdev_kv_get_stats`` entry: where the namespace is, its tiers, the engine's own
    ``describe()`` (every counter it keeps, regions and I/O mode included)."""
    return {
        "name": name,
        "nqn": nqn,
        "nsid": nsid,
        "bdev_name": bdev_name,
        "tiers": [t.to_json() for t in tier_stats(engine)],
        "engine": engine.describe(),
    }


# --- printing -------------------------------------------------------------------------------
COLUMNS = (
    ("tier", "<"),
    ("hits", ">"),
    ("misses", ">"),
    ("hit ratio", ">"),
    ("evictions", ">"),
    ("bytes in", ">"),
    ("bytes out", ">"),
    ("used", ">"),
    ("capacity", ">"),
    ("crc drops", ">"),
)


def _size(n: int) -> str:
    return format_size(n).replace(" ", "")


def title(entry: Mapping[str, object]) -> str:
    """``NQN nsid N (NAME): ENGINE ...``, or ``bdev NAME (no namespace): ...``."""
    engine = entry.get("engine")
    details = ""
    if isinstance(engine, Mapping):
        details = str(engine.get("engine", ""))
        flash = engine.get("flash", engine)
        if isinstance(flash, Mapping) and "path" in flash:
            details += f", flash {flash['path']} ({flash.get('io_mode')} I/O)"
    if entry.get("nqn") is None:
        where = f"bdev {entry.get('name')} (no namespace)"
    else:
        where = f"{entry['nqn']} nsid {entry['nsid']} ({entry.get('name')})"
    return f"{where}: {details}" if details else where


def _table(tiers: Sequence[TierStats]) -> list[str]:
    rows = [[name for name, _ in COLUMNS]]
    for t in tiers:
        ratio = t.hit_ratio
        rows.append(
            [
                t.tier,
                str(t.hits),
                str(t.misses),
                "-" if ratio is None else f"{ratio:.3f}",
                str(t.evictions),
                _size(t.bytes_in),
                _size(t.bytes_out),
                _size(t.used_bytes),
                _size(t.capacity_bytes),
                "-" if t.crc_dropped is None else str(t.crc_dropped),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for j, r in enumerate(rows):
        parts = [f"{v:{align}{w}}" for v, (_, align), w in zip(r, COLUMNS, widths, strict=True)]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_stats(entries: Sequence[Mapping[str, object]]) -> str:
    """Per namespace a title line, then a table with one row per tier (bytes in binary units)."""
    if not entries:
        return "no KV namespaces"
    blocks = []
    for entry in entries:
        tiers = entry.get("tiers")
        if not isinstance(tiers, list):
            raise ValueError(f"stats entry without tiers: {entry!r}")
        blocks.append("\n".join([title(entry), *_table([TierStats.from_json(t) for t in tiers])]))
    return "\n\n".join(blocks)
