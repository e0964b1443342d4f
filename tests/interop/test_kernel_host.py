"""Linux 6.12's NVMe/TCP host (nvme-cli 2.3, in the lab guest) against our target.

The guest reaches this process's target at 10.0.2.2 (QEMU user networking). The target has a KV
namespace (nsid 1, CSI 1) and a RAM block namespace (nsid 2).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator

import pytest

from tests.interop.conftest import BLOCK_MIB, BLOCK_NSID, KV_NSID, Lab, LabTarget
from tools.lab.guest import GUEST_HOST_ADDRESS, Guest

pytestmark = pytest.mark.lab

# Shell helpers run in the guest before each test's commands.
HELPERS = r"""
dev_for_nsid() {  # the namespace head (nvmeXnY) of NSID $1 on the subsystem named $2
    for b in /sys/block/nvme*n*; do
        case ${b##*/} in *c*) continue ;; esac
        [ "$(cat "$b/nsid")" = "$1" ] && [ "$(cat "$b/device/subsysnqn")" = "$2" ] || continue
        echo "${b##*/}"
        return 0
    done
    return 1
}
wait_nsid() {  # wait until NSID $1 of subsystem $2 has a namespace head
    for _ in $(seq 100); do dev_for_nsid "$1" "$2" >/dev/null && return 0; sleep 0.1; done
    echo "no namespace head for nsid $1"; ls /sys/block; dmesg | tail -20; return 1
}
"""


def connect_cmd(rt: LabTarget, extra: str = "") -> str:
    return (
        f"nvme connect -t tcp -a {GUEST_HOST_ADDRESS} -s {rt.io_port} -n {rt.nqn} {extra} -o json"
    )


def run(guest: Guest, script: str, *, timeout: float = 120.0) -> str:
    return guest.run(HELPERS + script, timeout=timeout, check=True).output


@pytest.fixture
def host(lab: Lab, lab_target: LabTarget) -> Iterator[Guest]:
    """The guest, with no controller left connected after the test."""
    yield lab.guest
    lab.guest.run("nvme disconnect-all >/dev/null 2>&1; true", timeout=60)


def test_nvme_discover_lists_our_subsystem(host: Guest, lab_target: LabTarget) -> None:
    rt = lab_target
    out = run(host, f"nvme discover -t tcp -a {GUEST_HOST_ADDRESS} -s {rt.discovery_port} -o json")
    records = json.loads(out)["records"]
    nvm = [r for r in records if r["subtype"] == "nvme subsystem"]
    assert [(r["subnqn"], r["trsvcid"].strip(), r["trtype"]) for r in nvm] == [
        (rt.nqn, str(rt.io_port), "tcp")
    ]
    current = [r for r in records if r["subtype"] == "current discovery subsystem"]
    assert [r["trsvcid"].strip() for r in current] == [str(rt.discovery_port)]
    # discovery answers on the I/O port as well (as nvmet does)
    out = run(host, f"nvme discover -t tcp -a {GUEST_HOST_ADDRESS} -s {rt.io_port} -o json")
    assert rt.nqn in [r["subnqn"] for r in json.loads(out)["records"]]


def test_connect_identify_and_disconnect(host: Guest, lab_target: LabTarget) -> None:
    rt = lab_target
    device = json.loads(run(host, connect_cmd(rt)))["device"]
    run(host, f"wait_nsid {BLOCK_NSID} {rt.nqn}")
    ctrl = json.loads(run(host, f"nvme id-ctrl /dev/{device} -o json"))
    subsystem = rt.target.subsystems[rt.nqn]
    assert ctrl["sn"].strip() == subsystem.serial_number
    assert ctrl["mn"].strip() == subsystem.model_number
    assert ctrl["subnqn"] == rt.nqn
    assert ctrl["cntrltype"] == 1
    assert ctrl["cntlid"] in subsystem.controllers
    assert ctrl["ioccsz"] >= 4
    assert ctrl["iorcsz"] >= 1
    assert ctrl["icdoff"] == 0
    assert ctrl["kas"] != 0
    head = run(host, f"dev_for_nsid {BLOCK_NSID} {rt.nqn}").strip()
    ns = json.loads(run(host, f"nvme id-ns /dev/{head} -o json"))
    assert ns["nsze"] == ns["ncap"] == BLOCK_MIB << 20 >> 9
    lbaf = ns["lbafs"][ns["flbas"] & 0xF]
    assert lbaf["ds"] == 9
    sizes = run(host, f"blockdev --getsize64 /dev/{head}")
    assert int(sizes) == BLOCK_MIB << 20
    # The KV namespace: the kernel knows no CSI 1 block device, only the generic char device.
    kernel_log = run(host, "dmesg")
    assert f"block device for nsid {KV_NSID} not supported (csi 1)" in kernel_log
    kv_head = run(host, f"dev_for_nsid {KV_NSID} {rt.nqn}").strip()
    assert run(host, f"test -c /dev/ng{kv_head[4:]} && test ! -e /dev/{kv_head} && echo ok") == (
        "ok\n"
    )
    out = run(host, f"nvme disconnect -n {rt.nqn}")
    assert "disconnected 1 controller(s)" in out
    assert run(host, "ls /sys/class/nvme | wc -l").strip() == "0"
    assert not subsystem.controllers, "the admin queue's teardown removed the controller"


FIO = (
    "fio --name=verify --filename=/dev/{dev} --rw=randwrite --bs={bs} --size={size}"
    " --direct=1 --ioengine=libaio --iodepth=8 --numjobs=1 --verify=crc32c --do_verify=1"
    " --verify_fatal=1 --output-format=json"
)


def _fio(host: Guest, rt: LabTarget, *, bs: str = "4k", size: str = "8M") -> dict[str, object]:
    head = run(host, f"wait_nsid {BLOCK_NSID} {rt.nqn} && dev_for_nsid {BLOCK_NSID} {rt.nqn}")
    out = run(host, FIO.format(dev=head.strip(), bs=bs, size=size), timeout=300)
    result: dict[str, object] = json.loads(out[out.index("{") :])
    return result


def test_fio_verify_on_the_block_namespace(host: Guest, lab_target: LabTarget) -> None:
    rt = lab_target
    run(host, connect_cmd(rt))
    job = _fio(host, rt)["jobs"][0]  # type: ignore[index]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 << 20
    assert job["read"]["io_bytes"] == 8 << 20  # the verify pass read everything back


@pytest.mark.parametrize(
    ("digests", "queues"),
    [("", 1), ("--hdr-digest --data-digest", 2), ("--hdr-digest", 2)],
    ids=["no-digests-1q", "digests-2q", "header-digest-2q"],
)
def test_digests_and_io_queues(
    host: Guest, lab_target: LabTarget, digests: str, queues: int
) -> None:
    rt = lab_target
    device = json.loads(run(host, connect_cmd(rt, f"{digests} --nr-io-queues {queues}")))["device"]
    assert run(host, f"cat /sys/class/nvme/{device}/queue_count").strip() == str(queues + 1)
    (controller,) = rt.target.subsystems[rt.nqn].controllers.values()
    assert controller.io_queues == set(range(1, queues + 1))
    # 128 KiB blocks span several data PDUs (and R2Ts) per command
    job = _fio(host, rt, bs="128k", size="4M")["jobs"][0]  # type: ignore[index]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] == 4 << 20


def test_writes_inside_the_capsule(host: Guest, big_capsule_target: LabTarget) -> None:
    """``gpucache target``'s IOCCSZ (8 MiB + 4 KiB): Linux then sends each write of up to that
    size inline (no R2T); fio writes 1 MiB blocks and verifies every one read back."""
    rt = big_capsule_target
    device = json.loads(run(host, connect_cmd(rt)))["device"]
    ident = json.loads(run(host, f"nvme id-ctrl /dev/{device} -o json"))
    assert ident["ioccsz"] * 16 - 64 >= 8 << 20
    job = _fio(host, rt, bs="1M", size="8M")["jobs"][0]  # type: ignore[index]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 << 20
    assert job["read"]["io_bytes"] == 8 << 20


def _passthru(kv_dev: str, opcode: int, key: bytes, extra: str) -> str:
    cdw2 = int.from_bytes(key[:4].ljust(4, b"\0"), "little")
    cdw3 = int.from_bytes(key[4:8].ljust(4, b"\0"), "little")
    return (
        f"nvme io-passthru /dev/{kv_dev} --opcode={opcode:#x} --namespace-id={KV_NSID}"
        f" --cdw2={cdw2} --cdw3={cdw3} --cdw11={len(key)} {extra}"
    )


def test_kv_store_and_retrieve_through_the_generic_char_device(
    host: Guest, lab_target: LabTarget
) -> None:
    rt = lab_target
    run(host, connect_cmd(rt))
    head = run(host, f"wait_nsid {KV_NSID} {rt.nqn} && dev_for_nsid {KV_NSID} {rt.nqn}").strip()
    ng = f"ng{head[4:]}"
    key = b"lab-key1"
    value = b"stored by the Linux kernel host"
    store = _passthru(
        ng, 0x01, key, f"--cdw10={len(value)} --data-len={len(value)} -w -i /tmp/value"
    )
    retrieve = _passthru(ng, 0x02, key, "--cdw10=4096 --data-len=4096 -r -b > /tmp/out")
    exist = _passthru(ng, 0x14, key, "")
    delete = _passthru(ng, 0x10, key, "")
    out = run(
        host,
        f"printf %s {shlex.quote(value.decode())} > /tmp/value\n"
        f"{store}\n{retrieve}\nhead -c {len(value)} /tmp/out; echo\n{exist}",
    )
    assert value.decode() in out
    assert f"result: {len(value):#010x}" in out, "Retrieve DW0 carries the value size"
    # the value is there for our own initiator too (raw, no framing)
    namespace = rt.target.subsystems[rt.nqn].namespaces[KV_NSID]
    assert namespace.describe()["keys"] == 1  # type: ignore[index]
    run(host, delete)
    gone = host.run(HELPERS + exist, timeout=60)
    assert gone.returncode != 0, gone.output  # Exist of a deleted key: KV status 0x87
