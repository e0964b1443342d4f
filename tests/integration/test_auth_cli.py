"""``gpucache gen-dhchap-key``, ``gpucache target --dhchap-host`` and the client's secrets."""

from __future__ import annotations

import subprocess
import sys

from nvmeof.spec.dhchap import DhchapSecret
from nvmeof.testing import spawn_target

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0c1e3f5a-8d21-4b7e-9f0a-2a3b4c5d6e7f"


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nvmeof.cli", *args], capture_output=True, timeout=60, check=False
    )


def test_gen_dhchap_key() -> None:
    out = cli("gen-dhchap-key", "--hmac", "3", "--key-length", "64")
    assert out.returncode == 0
    secret = DhchapSecret.parse(out.stdout.decode())
    assert secret.transform == 3
    assert len(secret.key) == 64


def test_target_with_dhchap_host_and_client_secrets() -> None:
    host = str(DhchapSecret.generate())
    ctrl = str(DhchapSecret.generate(48, transform=2))
    with spawn_target("--capacity", "16MiB", "--dhchap-host", f"{HOSTNQN}={host},{ctrl}") as rt:
        base = ["-a", f"{rt.host}:{rt.port}", "-n", rt.nqn, "--hostnqn", HOSTNQN]
        put = cli("put", *base, "--dhchap-secret", host, "--dhchap-ctrl-secret", ctrl, "k", "v")
        assert put.returncode == 0, put.stderr
        got = cli("get", *base, "--dhchap-secret", host, "k")
        assert got.stdout == b"v"
        refused = cli("get", *base, "k")
        assert refused.returncode != 0
        assert b"authentication" in refused.stderr
        wrong = cli("get", *base, "--dhchap-secret", str(DhchapSecret.generate()), "k")
        assert wrong.returncode != 0
