"""The interop lab: a Debian bookworm guest with a real Linux 6.12 kernel, booted under QEMU (TCG).

The image comes from ``tools/lab/build-image.sh`` (cached outside the checkout, built when missing).
The checkout is shared into the guest read-only at ``/src`` (9p); the network is QEMU user mode (the
guest reaches the host's loopback services at 10.0.2.2; ``forwards`` map host ports on 127.0.0.1 to
guest ports). Commands run as root in the guest through an agent on its second serial port, each
returning its exit code and output.

    python tools/lab/guest.py build                      build (or find) the image; print its path
    python tools/lab/guest.py run [-f HOST:GUEST]... -- CMD [ARG]...   boot, run, power off

KVM is not used: on these machines a nested KVM guest hangs after the BIOS, and TCG boots this
kernel in seconds.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent.parent
BUILD_SCRIPT = LAB_DIR / "build-image.sh"
GUEST_HOST_ADDRESS = "10.0.2.2"  # the host, as the guest sees it (user-mode networking)
GUEST_ADDRESS = "10.0.2.15"


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class CommandResult:
    command: str
    returncode: int
    output: str

    def check(self) -> CommandResult:
        if self.returncode != 0:
            raise LabError(
                f"guest command failed (exit {self.returncode}): {self.command}\n{self.output}"
            )
        return self


def build_image(*, force: bool = False) -> Path:
    """The image directory (vmlinuz, initrd.img, rootfs.ext4), built if missing."""
    cmd = [str(BUILD_SCRIPT), *(["--force"] if force else [])]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"building the lab image failed (exit {proc.returncode})")
    return Path(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Guest:
    """One booted guest; a context manager that powers it off on exit."""

    def __init__(
        self,
        image: Path | None = None,
        *,
        forwards: Mapping[int, int] | None = None,
        memory_mb: int = 1024,
        cpus: int = 2,
        share: Path = REPO,
        boot_timeout: float = 180.0,
    ) -> None:
        self.image = image
        self.forwards = dict(forwards or {})
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.share = share
        self.boot_timeout = boot_timeout
        self.kernel_release = ""
        self._tmp = tempfile.TemporaryDirectory(prefix="gpucache-lab-")
        self.run_dir = Path(self._tmp.name)
        self.console_log = self.run_dir / "console.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._agent: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1

    # --- lifecycle ---------------------------------------------------------------------------
    def qemu_command(self, image: Path) -> list[str]:
        hostfwd = "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-{GUEST_ADDRESS}:{guest}"
            for host, guest in sorted(self.forwards.items())
        )
        agent = self.run_dir / "agent.sock"
        return [
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi",
            "-cpu", "max",
            "-smp", str(self.cpus),
            "-m", str(self.memory_mb),
            "-no-reboot",
            "-display", "none",
            "-monitor", "none",
            "-kernel", str(image / "vmlinuz"),
            "-initrd", str(image / "initrd.img"),
            "-append", "console=ttyS0 panic=-1 loglevel=5 rw",
            "-drive", f"file={image / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on",
            "-virtfs", f"local,path={self.share},mount_tag=src,security_model=none,readonly=on",
            "-netdev", f"user,id=n0{hostfwd}",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.console_log}",
            "-chardev", f"socket,id=agent,path={agent},server=on,wait=off",
            "-serial", "chardev:agent",
        ]  # fmt: skip

    def start(self) -> Guest:
        """Boot the guest; a boot that dies is tried once more. (QEMU's TCG with two vCPUs now
        and then oopses in the kernel's early text patching, int3 in sched_clock_cpu: the
        machine's emulation, not the kernel's or our fault, and the next boot is fine.)"""
        try:
            return self._boot()
        except LabError as first:
            console = self.console()
            self.close()
            print(f"lab: the guest did not boot, booting it once more:\n{console[-1500:]}")
            try:
                return self._boot()
            except LabError:
                raise first from None

    def _boot(self) -> Guest:
        self._buffer = b""
        (self.run_dir / "agent.sock").unlink(missing_ok=True)
        image = self.image or build_image()
        cmd = self.qemu_command(image)
        with open(self.run_dir / "qemu.log", "wb") as qemu_log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.boot_timeout
        agent_path = self.run_dir / "agent.sock"
        while True:
            self._check_alive()
            if agent_path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(agent_path))
                except OSError:
                    sock.close()
                else:
                    self._agent = sock
                    break
            if time.monotonic() > deadline:
                raise LabError(f"QEMU did not open its agent socket:\n{self.console()}")
            time.sleep(0.05)
        line = self._read_line(deadline, prefix=b"@@LAB-READY")
        self.kernel_release = line.split()[1].decode() if len(line.split()) > 1 else ""
        return self

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if self._agent is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                self._agent.sendall(b"poweroff\n")
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        self._proc = None

    def __enter__(self) -> Guest:
        try:
            return self.start()
        except BaseException:
            self.close()
            self._tmp.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        self._tmp.cleanup()

    # --- commands ----------------------------------------------------------------------------
    def run(self, command: str, *, timeout: float = 120.0, check: bool = False) -> CommandResult:
        """Run ``command`` with ``sh`` in the guest (as root); its exit code and output."""
        if self._agent is None:
            raise LabError("the guest is not running")
        cid = self._next_id
        self._next_id += 1
        script = base64.b64encode(command.encode()).decode()
        self._agent.sendall(f"{cid} {max(1, int(timeout))} {script}\n".encode())
        deadline = time.monotonic() + timeout + 30
        while True:
            line = self._read_line(deadline, prefix=b"@@LAB ")
            _, rid, rc, *payload = line.split(b" ", 3)
            if int(rid) == cid:
                break
        output = base64.b64decode(payload[0] if payload else b"").decode(errors="replace")
        returncode = int(rc)
        if returncode == 137:
            output += f"\n[lab: killed after {timeout:.0f} s]"
        result = CommandResult(command, returncode, output)
        return result.check() if check else result

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            qemu_log = (self.run_dir / "qemu.log").read_text(errors="replace")
            raise LabError(
                f"QEMU exited with {self._proc.returncode}:\n{qemu_log}\n{self.console()[-4000:]}"
            )

    def _read_line(self, deadline: float, *, prefix: bytes) -> bytes:
        assert self._agent is not None
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                line = line.rstrip(b"\r")
                start = line.find(prefix)
                if start >= 0:
                    return line[start:]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(f"no answer from the guest agent:\n{self.console()[-4000:]}")
            self._agent.settimeout(min(remaining, 1.0))
            try:
                chunk = self._agent.recv(65536)
            except TimeoutError:
                self._check_alive()
                continue
            if not chunk:
                self._check_alive()
                raise LabError(f"the guest agent closed:\n{self.console()[-4000:]}")
            self._buffer += chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/lab/guest.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build the guest image if missing; print its directory")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    run = sub.add_parser("run", help="boot the guest, run one command, power off")
    run.add_argument("-f", "--forward", action="append", default=[], help="HOSTPORT:GUESTPORT")
    run.add_argument("--timeout", type=float, default=300.0)
    run.add_argument("--console", action="store_true", help="print the guest console afterwards")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "build":
        print(build_image(force=args.force))
        return 0
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not words:
        parser.error("run needs a command")
    command = words[0] if len(words) == 1 else shlex.join(words)
    forwards = dict(tuple(int(p) for p in f.split(":", 1)) for f in args.forward)
    start = time.monotonic()
    with Guest(forwards=forwards) as guest:
        booted_s = time.monotonic() - start
        result = guest.run(command, timeout=args.timeout)
        sys.stdout.write(result.output)
        if args.console:
            sys.stderr.write(guest.console())
    print(
        f"[lab: {guest.kernel_release}, booted in {booted_s:.1f} s, exit {result.returncode},"
        f" {time.monotonic() - start:.1f} s in all]",
        file=sys.stderr,
    )
    return result.returncode


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
