"""``check(path, fix=False)``: verify a flash device, in the spirit of diskcache's ``Cache.check``.

It reads the superblock, scans every region in full (ignoring the checkpoint), verifies each live
record's CRC, and compares the checkpoint with what the scan found. With ``fix`` it erases the
headers of records that failed their CRC and writes a fresh checkpoint from the scan.
The device is never formatted here. Run it on a device no target is serving.
"""

from __future__ import annotations

import attrs

from kvext.engine.base import EngineLimits
from kvext.engine.device import BlockDevice, aligned_buffer
from kvext.engine.flash import FlashEngine
from kvext.engine.record import ALIGN
from kvext.engine.region import REGION_HEADER_SIZE, FormatError, RegionState, Superblock


@attrs.define
class CheckReport:
    path: str
    io_mode: str = ""
    regions: int = 0
    regions_in_use: int = 0
    keys: int = 0
    live_bytes: int = 0
    crc_dropped: int = 0
    checkpoint: str = "absent"  # absent | consistent | stale (entries the scan does not confirm)
    fixed: bool = False
    problems: list[str] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.crc_dropped == 0

    def summary(self) -> str:
        lines = [
            f"{self.path}: {'ok' if self.ok else 'PROBLEMS'}",
            f"  io: {self.io_mode}, regions: {self.regions_in_use}/{self.regions} in use",
            f"  keys: {self.keys} ({self.live_bytes} bytes), records dropped by CRC: "
            f"{self.crc_dropped}",
            f"  checkpoint: {self.checkpoint}" + (" (rewritten)" if self.fixed else ""),
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def check(path: str, fix: bool = False) -> CheckReport:
    report = CheckReport(path)
    try:
        device = BlockDevice.open(path)
    except OSError as exc:
        report.problems.append(f"cannot open: {exc.strerror or exc}")
        return report
    report.io_mode = device.mode.value
    try:
        block = aligned_buffer(ALIGN)
        device.read_into(block, 0)
        try:
            superblock = Superblock.unpack(block)
        except FormatError as exc:
            report.problems.append(str(exc))
            return report
        usable = superblock.region_size - REGION_HEADER_SIZE
        limits = EngineLimits(
            max_value_length=usable - ALIGN, capacity_bytes=superblock.region_count * usable
        )
        engine = FlashEngine(device, superblock, limits)
        checkpoint = engine._read_checkpoint()
        engine._recover(use_checkpoint=False)
        _verify_live_records(engine, report)
        if checkpoint is not None:
            report.checkpoint = "consistent"
            for region in engine._regions:
                if region.state is RegionState.FREE:
                    continue
                same = checkpoint.generations[region.index] == region.generation
                listed = {k for k, e in checkpoint.entries.items() if e.region == region.index}
                if same and listed != region.keys:
                    report.checkpoint = "stale"
        report.regions = superblock.region_count
        report.regions_in_use = sum(r.state is not RegionState.FREE for r in engine._regions)
        report.keys = len(engine)
        report.live_bytes = engine.used_bytes
        if fix:
            # Erase the headers of records that failed (so later scans skip them quietly), then
            # write the checkpoint of what the scan found intact.
            zero = aligned_buffer(ALIGN)
            for region_index, offset in engine.bad_records:
                device.write(zero, superblock.region_offset(region_index) + offset)
            engine.close()
            report.fixed = True
    finally:
        device.close()
    return report


def _verify_live_records(engine: FlashEngine, report: CheckReport) -> None:
    """Read back every indexed record (the scan verified it once; this checks the index too)."""
    for key in engine.list_keys():
        entry = engine._index[key]
        region = engine._regions[entry.region]
        buf = aligned_buffer(entry.record_len)
        engine.device.read_into(buf, engine.superblock.region_offset(entry.region) + entry.offset)
        if not engine._verify(buf, key, entry, region.generation):
            report.problems.append(f"record of {key!r} in region {entry.region} does not verify")
            engine._drop(key)
            report.crc_dropped += 1
    report.crc_dropped += engine.stats.crc_dropped
