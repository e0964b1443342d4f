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
.venv/bin/python -m pytest "$@"
