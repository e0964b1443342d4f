"""DH-HMAC-CHAP against Linux 6.12 (lab guest): the kernel host (nvme-cli 2.3) authenticating to our
target, and our initiator authenticating to the kernel's nvmet-tcp target (configfs host keys).

Every case pins the negotiated hash and DH group (our target offers only one of each; the host
offers all) so that each FFDHE group's session-key hashing and DH value size is checked against
the kernel.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import attrs
import pytest

from nvmeof.errors import AuthenticationFailed, ConnectionLost
from nvmeof.initiator.block import BlockNamespaceClient
from nvmeof.initiator.controller import Controller
from nvmeof.spec.auth import DhGroupId, HashId
from nvmeof.spec.dhchap import DhchapSecret
from nvmeof.target.auth import HostAuthConfig
from tests.interop.conftest import BLOCK_NSID, GUEST_NVMET_PORT, Lab, LabTarget
from tools.lab.guest import GUEST_HOST_ADDRESS, Guest, free_port

pytestmark = pytest.mark.lab

NVMET_AUTH_NQN = "nqn.2024-01.io.gpucache:nvmet-auth"
CFG = "/sys/kernel/config/nvmet"
TIMEOUT = 120.0
_hosts = itertools.count(1)

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
wait_nsid() {
    for _ in $(seq 100); do dev_for_nsid "$1" "$2" >/dev/null && return 0; sleep 0.1; done
    echo "no namespace head for nsid $1"; dmesg | tail -20; return 1
}
"""


def new_hostnqn() -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}-auth{next(_hosts)}"


def secret(transform: int, length: int) -> DhchapSecret:
    return DhchapSecret.generate(length, transform=transform)


def gen_in_guest(guest: Guest, args: str) -> str:
    out = guest.run(f"nvme gen-dhchap-key {args}", timeout=30, check=True).output
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def kernel(lab: Lab) -> Guest:
    """The guest, after checking that its kernel was built with NVMe in-band authentication."""
    guest = lab.guest
    guest.run("modprobe nvme-fabrics; modprobe nvme-tcp; modprobe nvmet", timeout=60, check=True)
    mods = guest.run("grep -h -o '^nvme_auth' /proc/modules; ls /sys/module | grep nvme_auth")
    assert "nvme_auth" in mods.output, "nvme-auth module missing (CONFIG_NVME_AUTH)"
    return guest


# --- the kernel host against our target ----------------------------------------------------------
@attrs.frozen
class KernelConnect:
    hostnqn: str
    returncode: int
    output: str
    device: str


@pytest.fixture
def host(kernel: Guest, lab_target: LabTarget) -> Iterator[Guest]:
    """The guest, with nothing connected and no per-host auth config left on our target after."""
    before = dict(lab_target.target.subsystems[lab_target.nqn].host_auth)
    yield kernel
    kernel.run("nvme disconnect-all >/dev/null 2>&1; true", timeout=60)
    subsystem = lab_target.target.subsystems[lab_target.nqn]
    subsystem.host_auth.clear()
    subsystem.host_auth.update(before)


def kernel_connect(
    guest: Guest,
    port: int,
    subnqn: str,
    hostnqn: str,
    host_secret: str,
    ctrl_secret: str | None = None,
) -> KernelConnect:
    extra = f" --dhchap-ctrl-secret {shlex.quote(ctrl_secret)}" if ctrl_secret else ""
    cmd = (
        f"nvme connect -t tcp -a {GUEST_HOST_ADDRESS} -s {port} -n {subnqn} --nr-io-queues 1"
        f" --hostnqn {hostnqn} --hostid {uuid.uuid4()} --dhchap-secret {shlex.quote(host_secret)}"
        f"{extra} -o json"
    )
    result = guest.run(cmd, timeout=TIMEOUT)
    device = ""
    if result.returncode == 0:
        device = json.loads(result.output[result.output.index("{") :])["device"]
    return KernelConnect(hostnqn, result.returncode, result.output, device)


def check_io(guest: Guest, device: str, subnqn: str) -> None:
    """id-ctrl on the controller, then a write and read-back on the block namespace."""
    ctrl = json.loads(guest.run(f"nvme id-ctrl /dev/{device} -o json", check=True).output)
    assert ctrl["subnqn"] == subnqn
    script = (
        f"{HELPERS}wait_nsid {BLOCK_NSID} {subnqn} && d=$(dev_for_nsid {BLOCK_NSID} {subnqn})\n"
        "dd if=/dev/urandom of=/tmp/a bs=4k count=16 2>/dev/null\n"
        "dd if=/tmp/a of=/dev/$d bs=4k oflag=direct 2>/dev/null\n"
        "dd if=/dev/$d of=/tmp/b bs=4k count=16 iflag=direct 2>/dev/null\n"
        "cmp /tmp/a /tmp/b && echo same"
    )
    assert guest.run(script, timeout=TIMEOUT, check=True).output.strip().endswith("same")


def auth_records(caplog: pytest.LogCaptureFixture, hostnqn: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "nvmeof.target.auth" and hostnqn in r.getMessage()
    ]


KERNEL_HOST_CASES = [
    # (id, host hh, host key length, ctrl secret (hh, length) or None, hash, DH group)
    ("hh00-sha256-null", 0, 32, None, HashId.SHA256, DhGroupId.NULL),
    ("hh01-sha256-ffdhe2048-bi", 1, 32, (1, 32), HashId.SHA256, DhGroupId.FFDHE2048),
    ("hh02-sha384-ffdhe3072", 2, 48, None, HashId.SHA384, DhGroupId.FFDHE3072),
    ("hh03-sha512-ffdhe4096-bi", 3, 64, (0, 64), HashId.SHA512, DhGroupId.FFDHE4096),
    ("hh01-sha384-ffdhe6144-bi", 1, 48, (2, 48), HashId.SHA384, DhGroupId.FFDHE6144),
    ("hh02-sha512-ffdhe8192", 2, 64, None, HashId.SHA512, DhGroupId.FFDHE8192),
]


@pytest.mark.parametrize(
    ("hh", "length", "ctrl", "hash_id", "group"),
    [c[1:] for c in KERNEL_HOST_CASES],
    ids=[c[0] for c in KERNEL_HOST_CASES],
)
def test_kernel_host_authenticates_to_our_target(
    host: Guest,
    lab_target: LabTarget,
    caplog: pytest.LogCaptureFixture,
    hh: int,
    length: int,
    ctrl: tuple[int, int] | None,
    hash_id: HashId,
    group: DhGroupId,
) -> None:
    caplog.set_level(logging.DEBUG, logger="nvmeof.target.auth")
    rt = lab_target
    hostnqn = new_hostnqn()
    host_key = secret(hh, length)
    ctrl_key = secret(*ctrl) if ctrl else None
    rt.target.subsystems[rt.nqn].host_auth[hostnqn] = HostAuthConfig(
        host_key=host_key, ctrl_key=ctrl_key, hashes=(hash_id,), dhgroups=(group,)
    )
    result = kernel_connect(
        host, rt.io_port, rt.nqn, hostnqn, str(host_key), str(ctrl_key) if ctrl_key else None
    )
    assert result.returncode == 0, result.output + host.run("dmesg | tail -20").output
    # admin and I/O queue both authenticated, with the pinned hash and group
    done = [m for m in auth_records(caplog, hostnqn) if "authenticated" in m]
    assert done == [f"host {hostnqn} authenticated to {rt.nqn} ({hash_id.name}, {group.name})"] * 2
    sysfs = host.run(f"cat /sys/class/nvme/{result.device}/dhchap_secret", check=True).output
    assert sysfs.strip() == str(host_key)
    check_io(host, result.device, rt.nqn)


def test_kernel_host_default_negotiation(
    host: Guest, lab_target: LabTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """With our default preferences the kernel ends up on SHA-512 and ffdhe8192."""
    caplog.set_level(logging.DEBUG, logger="nvmeof.target.auth")
    rt = lab_target
    hostnqn = new_hostnqn()
    host_key = DhchapSecret.parse(gen_in_guest(host, f"-m 1 -l 32 -n {hostnqn}"))
    rt.target.subsystems[rt.nqn].host_auth[hostnqn] = HostAuthConfig(host_key=host_key)
    result = kernel_connect(host, rt.io_port, rt.nqn, hostnqn, str(host_key))
    assert result.returncode == 0, result.output
    done = [m for m in auth_records(caplog, hostnqn) if "authenticated" in m]
    assert done == [f"host {hostnqn} authenticated to {rt.nqn} (SHA512, FFDHE8192)"] * 2


def test_kernel_host_wrong_secret_is_refused(
    host: Guest, lab_target: LabTarget, caplog: pytest.LogCaptureFixture
) -> None:
    rt = lab_target
    hostnqn = new_hostnqn()
    rt.target.subsystems[rt.nqn].host_auth[hostnqn] = HostAuthConfig(
        host_key=secret(1, 32), dhgroups=(DhGroupId.FFDHE2048,)
    )
    result = kernel_connect(host, rt.io_port, rt.nqn, hostnqn, str(secret(1, 32)))
    assert result.returncode != 0, result.output
    assert any("host response does not match" in m for m in auth_records(caplog, hostnqn))
    assert not any(c.hostnqn == hostnqn for c in rt.target.subsystems[rt.nqn].controllers.values())
    assert "authentication failed" in host.run("dmesg | tail -30").output


def test_kernel_host_detects_a_wrong_controller_secret(
    host: Guest, lab_target: LabTarget, caplog: pytest.LogCaptureFixture
) -> None:
    rt = lab_target
    hostnqn = new_hostnqn()
    host_key = secret(1, 32)
    rt.target.subsystems[rt.nqn].host_auth[hostnqn] = HostAuthConfig(
        host_key=host_key, ctrl_key=secret(1, 32), dhgroups=(DhGroupId.FFDHE2048,)
    )
    result = kernel_connect(host, rt.io_port, rt.nqn, hostnqn, str(host_key), str(secret(1, 32)))
    assert result.returncode != 0, result.output
    # the kernel rejects R2 and tells us with a Failure2
    assert any("aborted authentication" in m for m in auth_records(caplog, hostnqn))


def test_kernel_host_against_the_cli_target(kernel: Guest, tmp_path: Path) -> None:
    """``gpucache target --dhchap-host HOSTNQN=SECRET,CTRL_SECRET`` (bidirectional) in a process."""
    hostnqn = new_hostnqn()
    subnqn = "nqn.2024-01.io.gpucache:auth-cli"
    host_key = DhchapSecret.parse(gen_in_guest(kernel, f"-m 2 -l 48 -n {hostnqn}"))
    ctrl_key = DhchapSecret.parse(gen_in_guest(kernel, "-m 3 -l 64"))
    port = free_port()
    ready = tmp_path / "ready"
    cmd = [
        sys.executable, "-m", "nvmeof.cli", "target", "-l", f"127.0.0.1:{port}", "-n", subnqn,
        "--capacity", "16MiB", "--malloc", "16MiB", "--no-discovery",
        "-r", str(tmp_path / "rpc.sock"), "--ready-file", str(ready),
        "--dhchap-host", f"{hostnqn}={host_key},{ctrl_key}",
    ]  # fmt: skip
    log = (tmp_path / "target.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd())
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "target.log").read_text()
            assert time.monotonic() < deadline, "the target did not start"
            time.sleep(0.1)
        result = kernel_connect(kernel, port, subnqn, hostnqn, str(host_key), str(ctrl_key))
        assert result.returncode == 0, result.output + (tmp_path / "target.log").read_text()
        check_io(kernel, result.device, subnqn)
        kernel.run(f"nvme disconnect -n {subnqn}", timeout=60, check=True)
        wrong = kernel_connect(kernel, port, subnqn, hostnqn, str(secret(2, 48)), str(ctrl_key))
        assert wrong.returncode != 0, wrong.output
        assert "host response does not match" in (tmp_path / "target.log").read_text()
    finally:
        kernel.run("nvme disconnect-all >/dev/null 2>&1; true", timeout=60)
        proc.terminate()
        proc.wait(10)
        log.close()


def test_nvme_gen_dhchap_key_output_parses(kernel: Guest) -> None:
    """nvme-cli's keys load in our parser; with --secret, hh 00 is the raw key and hh 01..03 with
    --nqn the key transformed as nvme_auth_transform_key does (so the kernel transforms twice)."""
    hostnqn = new_hostnqn()
    raw = os.urandom(32)
    plain = DhchapSecret.parse(gen_in_guest(kernel, f"-s {raw.hex()} -m 0 -l 32"))
    assert plain == DhchapSecret(raw, 0)
    assert str(plain) == gen_in_guest(kernel, f"-s {raw.hex()} -m 0 -l 32")
    for hh, length in ((1, 32), (2, 48), (3, 64)):
        key = os.urandom(length)
        out = gen_in_guest(kernel, f"-s {key.hex()} -m {hh} -l {length} -n {hostnqn}")
        parsed = DhchapSecret.parse(out)
        assert parsed.transform == hh
        assert parsed.key == DhchapSecret(key, hh).transformed(hostnqn)
        assert str(parsed) == out


# --- our initiator against the kernel's nvmet-tcp target -----------------------------------------
@pytest.fixture(scope="module")
def nvmet_auth(kernel: Guest, lab: Lab) -> Iterator[tuple[str, int]]:
    """nvmet subsystem NVMET_AUTH_NQN open only to hosts linked into its allowed_hosts."""
    kernel.run(f"sh /src/tools/lab/nvmet-setup.sh {NVMET_AUTH_NQN} {GUEST_NVMET_PORT}", check=True)
    kernel.run(f"echo 0 > {CFG}/subsystems/{NVMET_AUTH_NQN}/attr_allow_any_host", check=True)
    yield "127.0.0.1", lab.nvmet_port
    kernel.run(
        f"rm -f {CFG}/subsystems/*/allowed_hosts/*; sh /src/tools/lab/nvmet-setup.sh --clear;"
        f" for h in {CFG}/hosts/*; do [ -d $h ] && rmdir $h; done; true",
        timeout=60,
    )


def nvmet_host(
    guest: Guest,
    hostnqn: str,
    host_key: DhchapSecret,
    ctrl_key: DhchapSecret | None,
    hash_id: HashId,
    group: DhGroupId,
) -> None:
    h = f"{CFG}/hosts/{hostnqn}"
    group_name = "null" if group is DhGroupId.NULL else group.name.lower()
    script = (
        f"mkdir {h}\n"
        f"echo '{host_key}' > {h}/dhchap_key\n"
        + (f"echo '{ctrl_key}' > {h}/dhchap_ctrl_key\n" if ctrl_key else "")
        + f"echo 'hmac({hash_id.hashlib_name})' > {h}/dhchap_hash\n"
        f"echo {group_name} > {h}/dhchap_dhgroup\n"
        f"ln -s {h} {CFG}/subsystems/{NVMET_AUTH_NQN}/allowed_hosts/{hostnqn}\n"
        f"head {h}/dhchap_*"
    )
    guest.run(script, check=True)


NVMET_CASES = [
    ("hh01-sha256-null", 1, 32, None, HashId.SHA256, DhGroupId.NULL),
    ("hh02-sha384-ffdhe2048-bi", 2, 48, (3, 64), HashId.SHA384, DhGroupId.FFDHE2048),
    ("hh00-sha512-ffdhe4096-bi", 0, 64, (0, 32), HashId.SHA512, DhGroupId.FFDHE4096),
    ("hh03-sha256-ffdhe3072", 3, 64, None, HashId.SHA256, DhGroupId.FFDHE3072),
]


async def _connect_and_io(
    address: tuple[str, int],
    hostnqn: str,
    host_key: DhchapSecret,
    ctrl_key: DhchapSecret | None,
    **kwargs: object,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with Controller.connect(
            address,
            NVMET_AUTH_NQN,
            hostnqn=hostnqn,
            dhchap_secret=host_key,
            dhchap_ctrl_secret=ctrl_key,
            io_queues=2,
            timeout=60,
            **kwargs,  # type: ignore[arg-type]
        ) as ctrl:
            client = BlockNamespaceClient(ctrl, 1)
            data = os.urandom(64 << 10)
            await client.write(8, data)
            assert bytes(await client.read(8, len(data) // client.block_size)) == data


@pytest.mark.parametrize(
    ("hh", "length", "ctrl", "hash_id", "group"),
    [c[1:] for c in NVMET_CASES],
    ids=[c[0] for c in NVMET_CASES],
)
def test_our_initiator_authenticates_to_nvmet(
    kernel: Guest,
    nvmet_auth: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
    hh: int,
    length: int,
    ctrl: tuple[int, int] | None,
    hash_id: HashId,
    group: DhGroupId,
) -> None:
    caplog.set_level(logging.DEBUG, logger="nvmeof.initiator.auth")
    hostnqn = new_hostnqn()
    host_key = secret(hh, length)
    ctrl_key = secret(*ctrl) if ctrl else None
    nvmet_host(kernel, hostnqn, host_key, ctrl_key, hash_id, group)
    anyio.run(_connect_and_io, nvmet_auth, hostnqn, host_key, ctrl_key)
    done = [
        r.getMessage()
        for r in caplog.records
        if r.name == "nvmeof.initiator.auth" and "authenticated" in r.getMessage()
    ]
    # admin queue and the I/O queues, each with what nvmet was told to use
    assert len(done) == 3, done
    assert all(f"({hash_id.name}, {group.name})" in m for m in done), done


def test_our_initiator_wrong_secret_is_refused_by_nvmet(
    kernel: Guest, nvmet_auth: tuple[str, int]
) -> None:
    hostnqn = new_hostnqn()
    nvmet_host(kernel, hostnqn, secret(1, 32), None, HashId.SHA256, DhGroupId.FFDHE2048)
    # nvmet answers the failed exchange with Failure1, but it may also tear the queue down
    # before our Authentication Receive reaches it (seen once under TCG): either way, refused.
    with pytest.raises((AuthenticationFailed, ConnectionLost)) as refused:
        anyio.run(_connect_and_io, nvmet_auth, hostnqn, secret(1, 32), None)
    if isinstance(refused.value, AuthenticationFailed):
        assert "Failure1" in str(refused.value)


def test_our_initiator_detects_a_wrong_nvmet_controller_secret(
    kernel: Guest, nvmet_auth: tuple[str, int]
) -> None:
    hostnqn = new_hostnqn()
    host_key = secret(1, 32)
    nvmet_host(kernel, hostnqn, host_key, secret(1, 32), HashId.SHA256, DhGroupId.FFDHE2048)
    with pytest.raises(AuthenticationFailed, match="controller response does not match"):
        anyio.run(_connect_and_io, nvmet_auth, hostnqn, host_key, secret(1, 32))
