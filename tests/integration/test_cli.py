"""The ``gpucache`` command line against a real target process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from nvmeof.testing import RunningTarget, spawn_target


@pytest.fixture(scope="module")
def target() -> Iterator[RunningTarget]:
    with spawn_target("--capacity", "64MiB") as running:
        yield running


def gpucache(
    target: RunningTarget, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    verb, *rest = args
    cmd = [sys.executable, "-m", "nvmeof.cli", verb, "-a", f"{target.host}:{target.port}"]
    return subprocess.run(
        [*cmd, "-n", target.nqn, *rest], input=stdin, capture_output=True, timeout=60, check=False
    )


def test_put_get_exists_list_delete(target: RunningTarget) -> None:
    assert gpucache(target, "put", "greeting", "hello world").returncode == 0
    got = gpucache(target, "get", "greeting")
    assert got.returncode == 0
    assert got.stdout == b"hello world"
    assert gpucache(target, "exists", "greeting").stdout.strip() == b"yes"
    listed = gpucache(target, "list")
    assert b"greeting" in listed.stdout.split()
    assert gpucache(target, "delete", "greeting").returncode == 0
    missing = gpucache(target, "exists", "greeting")
    assert (missing.returncode, missing.stdout.strip()) == (1, b"no")
    absent = gpucache(target, "get", "greeting")
    assert absent.returncode == 1
    assert b"not found" in absent.stderr


def test_put_from_stdin_with_digests(target: RunningTarget) -> None:
    blob = bytes(range(256)) * 1000
    put = gpucache(target, "put", "--header-digest", "--data-digest", "blob", "-", stdin=blob)
    assert put.returncode == 0, put.stderr
    got = gpucache(target, "get", "--data-digest", "blob")
    assert got.stdout == blob


def test_verbose_traces_commands(target: RunningTarget) -> None:
    cmd = [
        sys.executable,
        "-m",
        "nvmeof.cli",
        "--verbose",
        "exists",
        "-a",
        f"{target.host}:{target.port}",
    ]
    out = subprocess.run(
        [*cmd, "-n", target.nqn, "nothing"], capture_output=True, timeout=60, check=False
    )
    assert b"opcode 0x14" in out.stderr  # the KV Exist command, traced with its status


def test_wrong_subsystem_is_a_clear_error(target: RunningTarget) -> None:
    cmd = [sys.executable, "-m", "nvmeof.cli", "get", "-a", f"{target.host}:{target.port}"]
    out = subprocess.run(
        [*cmd, "-n", "nqn.2024-01.io.example:nope", "k"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert b"refused" in out.stderr


def test_target_refuses_a_busy_port(target: RunningTarget) -> None:
    cmd = [sys.executable, "-m", "nvmeof.cli", "target", "--listen", f"{target.host}:{target.port}"]
    out = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert out.returncode == 1
    assert b"cannot start the target" in out.stderr
