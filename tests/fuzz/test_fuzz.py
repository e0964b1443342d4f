"""Run each fuzz target under atheris for a few seconds (CI), and replay every saved finding.

Longer runs: ``tools/fuzz.sh [seconds] [target...]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

HERE = Path(__file__).parent
REGRESSIONS = HERE / "regressions"
SECONDS = int(os.environ.get("GPUCACHE_FUZZ_SECONDS", "5"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_replay_regressions(name: str) -> None:
    """Every input that once crashed (or hung, or exhausted memory) now decodes or is refused
    with our own error."""
    for path in sorted((REGRESSIONS / name).glob("*")) if (REGRESSIONS / name).is_dir() else []:
        TARGETS[name](path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_briefly(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = REGRESSIONS / name
    args = [str(corpus)] + ([str(seeds)] if seeds.is_dir() else [])
    command = [
        sys.executable, str(HERE / "run.py"), name, f"-max_total_time={SECONDS}",
        "-rss_limit_mb=1024", "-timeout=10", f"-artifact_prefix={tmp_path}/", *args,
    ]  # fmt: skip
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        check=False,
        cwd=HERE.parents[1],
    )
    found = sorted(p.name for p in tmp_path.glob("*-*") if p.is_file())
    assert run.returncode == 0, f"{name}: {found}\n{run.stderr[-4000:]}"
