"""``gpucache sim``: run a scenario, print the table, write the plot.

``--scenario`` takes a JSON file, or the name of a bundled one (``simulator/scenarios/*.json``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

import attrs

from simulator.scenario import Scenario

SCENARIOS = Path(__file__).parent / "scenarios"


def bundled() -> list[str]:
    return sorted(p.stem for p in SCENARIOS.glob("*.json"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        default="small-cluster",
        help=f"a scenario JSON file, or a bundled one: {', '.join(bundled())}",
    )
    parser.add_argument(
        "--mode",
        choices=["analytic", "protocol"],
        default="analytic",
        help="analytic: queueing arithmetic, any size; protocol: the real NVMe/TCP stacks over"
        " simulated links (small clusters)",
    )
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument("--duration", type=float, help="override the simulated seconds")
    parser.add_argument("--plot", help="PNG to write (default: sim-<scenario>-<mode>.png)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--json", help="also write every figure as JSON here")
    parser.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )


def load(name: str) -> Scenario:
    path = Path(name)
    if not path.exists() and (SCENARIOS / f"{name}.json").exists():
        path = SCENARIOS / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no scenario {name!r} (bundled: {', '.join(bundled())})")
    return Scenario.load(path)


class ProgressBar:
    """``[#####.....]  45%  sim 1620/3600 s  12 s`` on one line of a terminal."""

    def __init__(self, total: float, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self.shown = -1

    def __call__(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if percent == self.shown:
            return
        self.shown = percent
        filled = int(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        self.stream.write(
            f"\r[{bar}] {percent:3d}%  sim {fraction * self.total:,.0f}/{self.total:,.0f} s"
            f"  {elapsed:,.0f} s"
        )
        if fraction >= 1.0:
            self.stream.write("\n")
        self.stream.flush()


def main(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", False):
        # Protocol mode runs whole targets and initiators: keep their lifecycle logs quiet.
        for name in ("nvmeof", "kvext", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        scenario = load(args.scenario)
    except (OSError, ValueError) as exc:
        print(f"gpucache sim: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        scenario = attrs.evolve(scenario, seed=args.seed)
    if args.duration is not None:
        scenario = attrs.evolve(
            scenario,
            duration=args.duration,
            workload=attrs.evolve(scenario.workload, duration=args.duration),
        )
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    progress = ProgressBar(scenario.duration) if show else None
    try:
        if args.mode == "protocol":
            from simulator.protocol import run_protocol

            report = run_protocol(scenario, progress)
        else:
            from simulator.cluster import run_analytic

            report = run_analytic(scenario, progress)
    except ValueError as exc:
        print(f"gpucache sim: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    if not args.no_plot:
        plot = Path(args.plot or f"sim-{scenario.name}-{args.mode}.png")
        report.plot(plot)
        print(f"\nplot: {plot}")
    return 0
