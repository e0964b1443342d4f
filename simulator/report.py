"""What a simulation found: metrics gathered per request, summarised as a table, JSON and a plot."""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

TIERS = ("host DRAM", "target DRAM", "target flash", "recomputed")
PERCENTILES = (50, 90, 99)


class Metrics:
    """Raw per-request figures, filled in by either mode."""

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = [0, 0, 0, 0]  # prompt tokens by TIERS
        self.fetch = array("d")  # seconds, requests that fetched anything
        self.ttft = array("d")  # with the tier
        self.ttft_base = array("d")  # recomputing every prompt in full
        self.gpu_seconds = 0.0  # prefill GPU-seconds spent with the tier
        self.gpu_seconds_base = 0.0  # ... and without it
        self.fetch_slower = 0  # requests whose fetch took longer than recomputing the hit
        self.bytes_read = 0
        self.bytes_written = 0
        self.evictions = 0
        self.degraded_reads = 0

    def record(
        self,
        *,
        tokens: Sequence[int],
        fetch: float | None,
        recompute_hit: float,
        ttft: float,
        ttft_base: float,
        gpu_seconds: float,
        gpu_seconds_base: float,
    ) -> None:
        self.requests += 1
        for i, n in enumerate(tokens):
            self.tokens[i] += n
        if fetch is not None:
            self.fetch.append(fetch)
            if fetch > recompute_hit:
                self.fetch_slower += 1
        self.ttft.append(ttft)
        self.ttft_base.append(ttft_base)
        self.gpu_seconds += gpu_seconds
        self.gpu_seconds_base += gpu_seconds_base


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@attrs.frozen
class Report:
    scenario: str
    mode: str
    seed: int
    duration: float
    hosts: int
    targets: int
    requests: int
    tier_tokens: tuple[int, int, int, int]
    fetch: tuple[float, ...]  # sorted
    ttft: tuple[float, ...]  # sorted
    ttft_base: tuple[float, ...]  # sorted
    gpu_seconds: float
    gpu_seconds_base: float
    fetch_slower: int
    bytes_read: int
    bytes_written: int
    evictions: int
    degraded_reads: int

    @classmethod
    def from_metrics(
        cls, metrics: Metrics, *, scenario: str, mode: str, seed: int, duration: float,
        hosts: int, targets: int,
    ) -> Report:  # fmt: skip
        t = metrics.tokens
        return cls(
            scenario=scenario,
            mode=mode,
            seed=seed,
            duration=duration,
            hosts=hosts,
            targets=targets,
            requests=metrics.requests,
            tier_tokens=(t[0], t[1], t[2], t[3]),
            fetch=tuple(sorted(metrics.fetch)),
            ttft=tuple(sorted(metrics.ttft)),
            ttft_base=tuple(sorted(metrics.ttft_base)),
            gpu_seconds=metrics.gpu_seconds,
            gpu_seconds_base=metrics.gpu_seconds_base,
            fetch_slower=metrics.fetch_slower,
            bytes_read=metrics.bytes_read,
            bytes_written=metrics.bytes_written,
            evictions=metrics.evictions,
            degraded_reads=metrics.degraded_reads,
        )

    # --- figures ------------------------------------------------------------------------------
    @property
    def hit_rates(self) -> dict[str, float]:
        total = sum(self.tier_tokens) or 1
        return {tier: n / total for tier, n in zip(TIERS, self.tier_tokens, strict=True)}

    @property
    def gpu_seconds_saved(self) -> float:
        return self.gpu_seconds_base - self.gpu_seconds

    def summary(self) -> dict[str, Any]:
        """Every figure of the table, rounded, as plain data (``--json``, tests)."""

        def pcts(values: Sequence[float]) -> dict[str, float]:
            return {f"p{p}": _round(percentile(values, p)) for p in PERCENTILES} | {
                "mean": _round(sum(values) / len(values) if values else math.nan)
            }

        return {
            "scenario": self.scenario,
            "mode": self.mode,
            "seed": self.seed,
            "duration_s": self.duration,
            "hosts": self.hosts,
            "targets": self.targets,
            "requests": self.requests,
            "hit_rate": {k: _round(v) for k, v in self.hit_rates.items()},
            "fetch_s": pcts(self.fetch),
            "ttft_s": pcts(self.ttft),
            "ttft_without_tier_s": pcts(self.ttft_base),
            "prefill_gpu_s": _round(self.gpu_seconds),
            "prefill_gpu_s_without_tier": _round(self.gpu_seconds_base),
            "prefill_gpu_s_saved": _round(self.gpu_seconds_saved),
            "fetches_slower_than_recompute": self.fetch_slower,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "evictions": self.evictions,
            "degraded_reads": self.degraded_reads,
        }

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2, sort_keys=True)

    def table(self) -> str:
        lines = [
            f"scenario {self.scenario} ({self.mode} mode, seed {self.seed}):"
            f" {self.hosts} GPU hosts, {self.targets} targets, {self.duration:g} s simulated,"
            f" {self.requests:,} requests",
            "",
            f"{'prompt tokens served from':<28}{'share':>10}",
        ]
        for tier, rate in self.hit_rates.items():
            lines.append(f"  {tier:<26}{rate:>10.1%}")
        lines += [
            "",
            f"{'':<28}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
            self._row("fetch latency", self.fetch),
            self._row("TTFT with the tier", self.ttft),
            self._row("TTFT recomputing", self.ttft_base),
            "",
            f"prefill GPU-seconds: {self.gpu_seconds_base:,.1f} recomputing everything,"
            f" {self.gpu_seconds:,.1f} with the tier:"
            f" {self.gpu_seconds_saved:,.1f} saved"
            f" ({self.gpu_seconds_saved / (self.gpu_seconds_base or 1):.1%})",
            f"requests whose fetch took longer than recomputing its hit: {self.fetch_slower:,}"
            f" of {len(self.fetch):,}",
            f"read {_bytes(self.bytes_read)}, wrote {_bytes(self.bytes_written)},"
            f" {self.evictions:,} evictions, {self.degraded_reads:,} degraded (EC) chunk reads",
        ]
        return "\n".join(lines)

    @staticmethod
    def _row(name: str, values: Sequence[float]) -> str:
        cells = [_ms(percentile(values, p)) for p in PERCENTILES]
        cells.append(_ms(sum(values) / len(values) if values else math.nan))
        return f"  {name:<26}" + "".join(f"{c:>10}" for c in cells)

    def plot(self, path: str | Path) -> Path:
        """Three panels: TTFT CDFs with and without the tier, fetch latency, hit rate by tier."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        path = Path(path)
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
        for values, label in ((self.ttft_base, "recomputing"), (self.ttft, "with the tier")):
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax1.plot([v * 1e3 for v in values], ys, label=label, drawstyle="steps-post")
        ax1.set_xscale("log")
        ax1.set_xlabel("time to first token (ms, log)")
        ax1.set_ylabel("fraction of requests")
        ax1.set_title("TTFT distribution")
        ax1.grid(True, which="both", alpha=0.3)
        ax1.legend()
        if self.fetch:
            lo, hi = max(min(self.fetch), 1e-6), max(self.fetch)
            bins = [lo * (hi / lo) ** (i / 40) for i in range(41)] if hi > lo else 10
            ax2.hist(self.fetch, bins=bins, color="tab:green")
            ax2.set_xscale("log")
            ax2.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax2.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 1e3:g}"))
            ax2.xaxis.set_minor_formatter(NullFormatter())
        ax2.set_xlabel("fetch latency per request (ms, log)")
        ax2.set_ylabel("requests")
        ax2.set_title("KV fetch latency")
        ax2.grid(True, alpha=0.3)
        rates = self.hit_rates
        ax3.bar(list(rates), [r * 100 for r in rates.values()],
                color=["tab:blue", "tab:cyan", "tab:orange", "tab:red"])  # fmt: skip
        ax3.set_ylabel("% of prompt tokens")
        ax3.set_title(f"served from (GPU-s saved: {self.gpu_seconds_saved:,.0f})")
        fig.suptitle(
            f"{self.scenario}: {self.hosts} hosts, {self.targets} targets,"
            f" {self.requests:,} requests ({self.mode} mode, seed {self.seed})"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
        return path


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def _ms(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x * 1e3:.2f}ms" if x < 10 else f"{x:.1f}s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
