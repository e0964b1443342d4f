#!/usr/bin/env bash
# Sets up GPUCache, starts a target on 127.0.0.1:4420 (left running), and runs a client that
# stores and reads back bytes and tensors over NVMe/TCP with the KV command set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

ADDRESS=${GPUCACHE_ADDRESS:-127.0.0.1:4420}
mkdir -p .run
if [ -f .run/target.pid ] && kill -0 "$(cat .run/target.pid)" 2>/dev/null; then
    echo "target already running (pid $(cat .run/target.pid))"
else
    rm -f .run/ready
    nohup .venv/bin/gpucache target --listen "$ADDRESS" --capacity 2GiB \
        --ready-file .run/ready >.run/target.log 2>&1 &
    echo $! >.run/target.pid
    for _ in $(seq 100); do
        [ -s .run/ready ] && break
        kill -0 "$(cat .run/target.pid)" 2>/dev/null || { cat .run/target.log; exit 1; }
        sleep 0.1
    done
    [ -s .run/ready ] || { echo "target did not start"; cat .run/target.log; exit 1; }
    echo "target running on $ADDRESS (pid $(cat .run/target.pid), log .run/target.log)"
fi

.venv/bin/gpucache put -a "$ADDRESS" greeting "hello from GPUCache"
.venv/bin/gpucache get -a "$ADDRESS" greeting; echo
.venv/bin/python examples/quickstart.py "$ADDRESS"
echo "the target keeps running: stop it with  kill \$(cat .run/target.pid)"
