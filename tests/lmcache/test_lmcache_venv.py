"""Runs the LMCache tests in the venv that has LMCache (LMCache pins numpy and setuptools below
this project's, so it lives in a venv of its own; docs/lmcache.md has the recipe).

The interpreter: ``$GPUCACHE_LMCACHE_PYTHON``, else ``.venv-lmcache/bin/python`` in the repo.
Where neither exists the test skips, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import lmcache_installed

ROOT = Path(__file__).parents[2]


def lmcache_python() -> Path | None:
    named = os.environ.get("GPUCACHE_LMCACHE_PYTHON")
    for candidate in (named, ROOT / ".venv-lmcache" / "bin" / "python"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


@pytest.mark.skipif(lmcache_installed(), reason="lmcache is installed here: ran directly")
def test_lmcache_suite_in_its_venv() -> None:
    python = lmcache_python()
    if python is None:
        message = "no LMCache venv (set GPUCACHE_LMCACHE_PYTHON or make .venv-lmcache)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-c", str(Path(__file__).parent / "lmcache-venv.ini"),
         "--rootdir", str(ROOT), "-q", str(Path(__file__).parent / "test_with_lmcache.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
    print(proc.stdout.strip().splitlines()[-1])
