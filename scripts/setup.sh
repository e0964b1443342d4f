#!/usr/bin/env bash
# Creates .venv with GPUCache and its test tools; installs tshark for the interop tests.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() {
    if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" >.venv/pip.log 2>&1; then
        cat .venv/pip.log
        exit 1
    fi
}
pip_install --upgrade pip
# torch is pinned: this exact CPU build is what the machines here install without a multi-GB download.
pip_install -e '.[dev]' 'torch==2.13.0'

# The test suite's real peers: tshark (NVMe/TCP dissector), redis-server and iperf3 (the bench's
# --compare peer and loopback bound).
if [ "${1:-}" = "--with-tshark" ]; then
    missing=""
    command -v tshark >/dev/null 2>&1 || missing="$missing tshark"
    command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
    command -v iperf3 >/dev/null 2>&1 || missing="$missing iperf3"
    if [ -n "$missing" ]; then
        export DEBIAN_FRONTEND=noninteractive
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
        echo "iperf3 iperf3/start_daemon boolean false" | $SUDO debconf-set-selections
        # shellcheck disable=SC2086
        $SUDO apt-get install -y -qq $missing >/dev/null
    fi
fi

# LMCache lives in a venv of its own: it pins numpy<=2.2.6 and setuptools<81 and pulls CUDA
# Python packages that the project's venv must not get. torch stays pinned to the CPU build on disk.
for arg in "$@"; do
    if [ "$arg" = "--with-lmcache" ] && [ ! -x .venv-lmcache/bin/python ]; then
        "$PYTHON" -m venv .venv-lmcache
        echo 'torch==2.13.0' >.venv-lmcache/constraints.txt
        if ! { .venv-lmcache/bin/pip install -q --disable-pip-version-check \
                -c .venv-lmcache/constraints.txt torch==2.13.0 lmcache==0.5.6 &&
            .venv-lmcache/bin/pip install -q --disable-pip-version-check \
                -c .venv-lmcache/constraints.txt -e '.[ec]'; } >.venv-lmcache/pip.log 2>&1; then
            cat .venv-lmcache/pip.log
            rm -rf .venv-lmcache
            exit 1
        fi
    fi
done

# The interop lab's guest (tools/lab: Debian bookworm + Linux 6.12 for QEMU), built once per machine
# and cached outside the checkout (/var/cache/gpucache-lab); the lab tests need it.
for arg in "$@"; do
    if [ "$arg" = "--with-lab" ]; then
        tools/lab/build-image.sh >/dev/null
    fi
done
