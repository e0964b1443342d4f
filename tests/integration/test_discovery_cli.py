"""``gpucache target --discovery-port`` and ``gpucache discover``."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from nvmeof.testing import TEST_NQN, spawn_target


def _gpucache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nvmeof.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_discover_through_the_discovery_port() -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        spawn_target("--discovery-port", "0", log_path=Path(tmp) / "target.log") as rt,
    ):
        # spawn_target reads the first address of the ready file: the I/O listener
        out = _gpucache("discover", "-a", f"{rt.host}:{rt.port}", "--json")
        assert out.returncode == 0, out.stderr
        records = json.loads(out.stdout)["records"]
        nvm = [r for r in records if r["subtype"] == "nvm"]
        assert [(r["subnqn"], r["trsvcid"], r["trtype"]) for r in nvm] == [
            (TEST_NQN, str(rt.port), "tcp")
        ]
        assert any(r["subtype"] == "current discovery" for r in records)
        text = _gpucache("discover", "-a", f"{rt.host}:{rt.port}")
        assert text.returncode == 0, text.stderr
        assert f"subnqn:  {TEST_NQN}" in text.stdout


def test_discover_reports_a_refused_connection() -> None:
    out = _gpucache("discover", "-a", "127.0.0.1:1", "--timeout", "5")
    assert out.returncode == 1
    assert "discover failed" in out.stderr
