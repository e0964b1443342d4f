#!/usr/bin/env bash
# Long fuzzing runs: tools/fuzz.sh [SECONDS] [TARGET...]   (default 600 s, every target)
# Corpora grow in tests/fuzz/corpus/<target>/ (ignored by git); crashes land in
# tests/fuzz/findings/<target>/. Copy a finding to tests/fuzz/regressions/<target>/ and fix it:
# test_fuzz.py replays every regression input on each CI run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SECONDS_PER_TARGET=${1:-600}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(pdu_stream_controller pdu_stream_host capsules dispatch)
fi
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "tests/fuzz/corpus/$t" "tests/fuzz/findings/$t"
    seeds=()
    [ -d "tests/fuzz/regressions/$t" ] && seeds=("tests/fuzz/regressions/$t")
    echo "== $t for ${SECONDS_PER_TARGET}s"
    "$PY" tests/fuzz/run.py "$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 \
        -timeout=10 -artifact_prefix="tests/fuzz/findings/$t/" \
        "tests/fuzz/corpus/$t" "${seeds[@]}" || status=1
done
exit $status
