"""The fleet what-if: determinism, the two modes agreeing, EC what-ifs, the CLI."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from nvmeof.cli import main as gpucache
from simulator.cli import load
from simulator.cluster import run_analytic
from simulator.protocol import run_protocol
from simulator.report import Report, percentile
from simulator.scenario import Scenario

DURATION = 15.0


def _small(duration: float = DURATION) -> Scenario:
    s = load("small-cluster")
    return attrs.evolve(s, duration=duration, workload=attrs.evolve(s.workload, duration=duration))


@pytest.fixture(scope="module")
def protocol_report() -> Report:
    return run_protocol(_small())


def test_protocol_mode_is_deterministic(protocol_report: Report) -> None:
    again = run_protocol(_small())
    assert again.to_json() == protocol_report.to_json()
    assert again.table() == protocol_report.table()
    assert again.ttft == protocol_report.ttft  # every request, not just the summary


def test_analytic_mode_is_deterministic() -> None:
    first = run_analytic(_small(60))
    assert run_analytic(_small(60)).to_json() == first.to_json()
    assert run_analytic(attrs.evolve(_small(60), seed=9)).to_json() != first.to_json()


def test_both_modes_agree_on_a_small_cluster(protocol_report: Report) -> None:
    """Tolerance: hit rates within 1 point; fetch and TTFT p50/p90 and GPU-seconds within 10 %.

    The modes differ only where the analytic arithmetic simplifies the protocol: PDU headers and
    capsules on the wire, stores landing when their Store completes rather than when prefill ends.
    """
    analytic = run_analytic(_small())
    p, a = protocol_report, analytic
    assert a.requests == p.requests
    for tier, rate in a.hit_rates.items():
        assert rate == pytest.approx(p.hit_rates[tier], abs=0.01), tier
    for name in ("fetch", "ttft", "ttft_base"):
        for pct in (50, 90):
            got = percentile(getattr(a, name), pct)
            want = percentile(getattr(p, name), pct)
            assert got == pytest.approx(want, rel=0.10), (name, pct)
    assert a.gpu_seconds == pytest.approx(p.gpu_seconds, rel=0.10)
    assert a.gpu_seconds_base == pytest.approx(p.gpu_seconds_base, rel=1e-9)


def test_the_tier_saves_prefill_and_ttft() -> None:
    report = run_analytic(_small(60))
    assert report.gpu_seconds_saved > 0
    assert percentile(report.ttft, 50) < percentile(report.ttft_base, 50)


def test_a_failed_target_means_degraded_reads() -> None:
    base = Scenario.from_dict(
        {
            "duration": 60,
            "model": {"name": "llama-3-8b", "tensor_parallel": 1},
            "hosts": {"count": 4},
            "targets": {"count": 6, "failed": [0]},
            "ec": {"data": 4, "parity": 2},
            "workload": {"session_rate": 1},
        }
    )
    degraded = run_analytic(base)
    assert degraded.degraded_reads > 0
    two_down = attrs.evolve(base, targets=attrs.evolve(base.targets, failed=(0, 1, 2)))
    lost = run_analytic(two_down)
    assert lost.hit_rates["target DRAM"] == 0  # 3 of 6 fragments gone: nothing readable


def test_fleet_scenario_runs_in_analytic_mode() -> None:
    s = load("fleet-1000x100")
    s = attrs.evolve(s, duration=5.0, workload=attrs.evolve(s.workload, duration=5.0))
    report = run_analytic(s)
    assert report.hosts == 1000
    assert report.targets == 100
    assert report.requests > 100


def test_protocol_mode_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="erasure"):
        run_protocol(attrs.evolve(_small(), ec_data=2))


def test_cli_prints_the_table_and_writes_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for run in range(2):
        plot, js = tmp_path / f"p{run}.png", tmp_path / f"r{run}.json"
        args = ["sim", "--scenario", "small-cluster", "--duration", "20"]
        assert gpucache([*args, "--plot", str(plot), "--json", str(js)]) == 0
        out = capsys.readouterr().out
        assert "TTFT with the tier" in out
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        outputs.append((out.replace(str(plot), ""), js.read_bytes(), plot.read_bytes()))
    assert outputs[0] == outputs[1]  # the same seed: byte-identical table, JSON and PNG


def test_cli_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpucache(["sim", "--scenario", "no-such-thing", "--no-plot"]) == 2
    assert "bundled" in capsys.readouterr().err
