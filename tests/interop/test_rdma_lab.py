"""NVMe/RDMA on soft-RoCE (rdma_rxe) inside the lab guest (Linux 6.12): our target and initiator on
real pyverbs, against each other and against the kernel (nvme-rdma host, nvmet-rdma target), and
ib_write_bw as the yardstick.

Everything RDMA runs inside the guest (rxe0 over its eth0, 10.0.2.15, talking to itself). The
guest image has no rdma-core, so ``rdma_root`` stages Debian's packages for it (the same
bookworm versions: python3-pyverbs, libibverbs1, librdmacm1, ibverbs-providers, perftest, libnl,
libpython3.11) into ``.run/lab-rdma-root``, which the guest copies over its root from the 9p share
(its disk is a throw-away snapshot). Our code runs on the guest's python3 (3.11) with the
checkout's virtualenv packages on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tools.lab.guest import REPO, Guest

from .conftest import Lab

pytestmark = [pytest.mark.lab, pytest.mark.rdma_lab]

GUEST_IP = "10.0.2.15"
LAB_NQN = "nqn.2024-01.io.gpucache:rdma-lab"
NVMET_NQN = "nqn.2024-01.io.gpucache:nvmet-rdma-lab"
PACKAGES = [
    "python3-pyverbs", "libibverbs1", "librdmacm1", "ibverbs-providers", "perftest",
    "libnl-3-200", "libnl-route-3-200", "libpci3", "libibumad3", "libpython3.11",
]  # fmt: skip
STAGE = REPO / ".run" / "lab-rdma-root"
ENV = "PYTHONPATH=/src:/src/.venv/lib/python3.11/site-packages"
GUEST_SCRIPT = "python3 -m tests.interop.rdma_lab_guest"


@pytest.fixture(scope="session")
def rdma_root() -> Path:
    if (STAGE / "usr" / "bin" / "ib_write_bw").exists():
        return STAGE
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb to stage rdma-core for the guest")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["apt-get", "download", *PACKAGES], cwd=tmp, capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"apt-get download of rdma-core packages failed: {proc.stderr[-500:]}")
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(STAGE)], check=True)
    return STAGE


@pytest.fixture(scope="session")
def rxe(lab: Lab, rdma_root: Path) -> Guest:
    guest = lab.guest
    setup = (
        "set -e; if ! command -v ib_write_bw >/dev/null; then"
        " cp -a /src/.run/lab-rdma-root/usr/. /usr/;"
        " cp -a /src/.run/lab-rdma-root/lib/. /usr/lib/;"
        " cp -a /src/.run/lab-rdma-root/etc/. /etc/; ldconfig; fi;"
        " modprobe rdma_rxe; rdma link show rxe0 >/dev/null 2>&1"
        " || rdma link add rxe0 type rxe netdev eth0; rdma link show rxe0"
    )
    result = guest.run(setup, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"soft-RoCE setup in the guest failed:\n{result.output}")
    probe = guest.run(f"{ENV} python3 -c 'import pyverbs.device'", timeout=60)
    if probe.returncode != 0:
        pytest.fail(f"pyverbs does not import in the guest:\n{probe.output}")
    return guest


def _start_target(guest: Guest, port: int) -> None:
    guest.run(
        f"cd /src && {ENV} nohup {GUEST_SCRIPT} serve {GUEST_IP} {port} {LAB_NQN}"
        f" > /tmp/serve{port}.log 2>&1 & echo $! > /tmp/serve{port}.pid;"
        f" for i in $(seq 1 150); do grep -q READY /tmp/serve{port}.log && break; sleep 1; done;"
        f" cat /tmp/serve{port}.log; grep -q READY /tmp/serve{port}.log",
        timeout=200,
        check=True,
    )


def _stop_target(guest: Guest, port: int) -> str:
    return guest.run(
        f"kill $(cat /tmp/serve{port}.pid) 2>/dev/null; sleep 1; tail -40 /tmp/serve{port}.log",
        timeout=30,
    ).output


def _result(output: str) -> dict[str, object]:
    match = re.search(r"^RESULT (.*)$", output, re.M)
    assert match, output
    parsed: dict[str, object] = json.loads(match.group(1))
    return parsed


def test_ib_write_bw_over_rxe(rxe: Guest) -> None:
    out = rxe.run(
        "(ib_write_bw -d rxe0 -s 1048576 -n 200 --report_gbits > /tmp/bw.log 2>&1 &); sleep 1;"
        f" ib_write_bw -d rxe0 -s 1048576 -n 200 --report_gbits {GUEST_IP}",
        timeout=300,
        check=True,
    ).output
    match = re.search(r"^\s*1048576\s+\d+\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert match, out
    print(f"ib_write_bw 1 MiB over rxe in the guest: {match.group(2)} Gb/s average")


def test_kv_put_get_our_initiator_to_our_target(rxe: Guest) -> None:
    _start_target(rxe, 4420)
    try:
        out = rxe.run(f"cd /src && {ENV} {GUEST_SCRIPT} kv {GUEST_IP} 4420 {LAB_NQN}", timeout=400)
    finally:
        log = _stop_target(rxe, 4420)
    assert out.returncode == 0, out.output + log
    figures = _result(out.output)
    print(f"our put/get over rxe (MB/s): {figures}")


def test_kernel_nvme_rdma_host_to_our_target(rxe: Guest) -> None:
    _start_target(rxe, 4421)
    try:
        out = rxe.run(
            "set -e; modprobe nvme-rdma;"
            f" nvme connect -t rdma -a {GUEST_IP} -s 4421 -n {LAB_NQN};"
            " sleep 2; for c in /sys/class/nvme/nvme*; do"
            f" grep -q {LAB_NQN} $c/subsysnqn && ctrl=$(basename $c); done;"
            " dev=/dev/${ctrl}n2; [ -b $dev ] || dev=$(ls /dev/${ctrl}*n2 | head -1);"
            " dd if=/dev/urandom of=/tmp/pattern bs=4096 count=64 2>/dev/null;"
            " dd if=/tmp/pattern of=$dev bs=4096 count=64 oflag=direct 2>/dev/null;"
            " dd if=$dev of=/tmp/back bs=4096 count=64 iflag=direct 2>/dev/null;"
            " cmp /tmp/pattern /tmp/back && echo SAME;"
            f" nvme disconnect -n {LAB_NQN}",
            timeout=300,
        )
    finally:
        log = _stop_target(rxe, 4421)
    assert out.returncode == 0, out.output + log
    assert "SAME" in out.output


NVMET_RDMA = f"""set -e
CFG=/sys/kernel/config/nvmet
modprobe null_blk nr_devices=1 memory_backed=1 gb=1 bs=512
modprobe nvmet; modprobe nvmet-rdma
[ -d $CFG ] || mount -t configfs configfs /sys/kernel/config
sub=$CFG/subsystems/{NVMET_NQN}
mkdir -p $sub; echo 1 > $sub/attr_allow_any_host
mkdir -p $sub/namespaces/1; echo /dev/nullb0 > $sub/namespaces/1/device_path
echo 1 > $sub/namespaces/1/enable
p=$CFG/ports/9; mkdir -p $p
echo rdma > $p/addr_trtype; echo ipv4 > $p/addr_adrfam
echo {GUEST_IP} > $p/addr_traddr; echo 4422 > $p/addr_trsvcid
ln -sf $sub $p/subsystems/{NVMET_NQN}
"""


def test_our_initiator_to_kernel_nvmet_rdma(rxe: Guest) -> None:
    rxe.run(NVMET_RDMA, timeout=60, check=True)
    out = rxe.run(f"cd /src && {ENV} {GUEST_SCRIPT} block {GUEST_IP} 4422 {NVMET_NQN}", timeout=300)
    assert out.returncode == 0, out.output
    assert _result(out.output)["ok"] is True
