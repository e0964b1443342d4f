"""Run one fuzz target under atheris: ``python tests/fuzz/run.py TARGET [libFuzzer flags]``.

e.g. ``python tests/fuzz/run.py capsules -max_total_time=600 tests/fuzz/corpus/capsules``.
A crash leaves ``crash-<sha1>`` (see ``-artifact_prefix``); copy it to
``tests/fuzz/regressions/<TARGET>/`` so test_regressions.py replays it forever.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["nvmeof", "kvext"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: run.py {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
