"""A thin wrapper over nvme-cli: discover, connect, disconnect, list (its JSON output, parsed).

Runs ``nvme`` through the ``sh`` package (``pip install gpucache[host]``). Needs root (or the
capabilities nvme-cli needs) and the kernel modules ``nvme-fabrics`` plus the transport's
(``nvme-tcp``); when those are absent it tries ``modprobe`` once, then says what is missing.
Parsing follows nvme-cli 2.x's ``-o json`` (checked against 2.3 on Debian bookworm).
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

FABRICS_DEVICE = Path("/dev/nvme-fabrics")
DEFAULT_TIMEOUT = 60.0
_TRANSPORT_MODULES = {"tcp": "nvme-tcp", "rdma": "nvme-rdma", "fc": "nvme-fc", "loop": "nvme-loop"}


class HostError(Exception):
    """Base of the kernel-host errors."""


class NvmeCliMissing(HostError):
    """nvme-cli (or the ``sh`` package) is not installed."""


class KernelModuleMissing(HostError):
    """The NVMe-oF host modules are not loaded and could not be loaded."""


class NvmeCliError(HostError):
    """nvme-cli ran and failed."""

    def __init__(self, argv: Sequence[str], exit_code: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} failed (exit {exit_code}): {output.strip()}")
        self.argv = list(argv)
        self.exit_code = exit_code
        self.output = output


@attrs.frozen
class DiscoveryRecord:
    """One ``nvme discover -o json`` record (nvme-cli spells types as words: "tcp", "nvme
    subsystem", "current discovery subsystem")."""

    trtype: str
    adrfam: str
    subtype: str
    treq: str
    portid: int
    trsvcid: str
    subnqn: str
    traddr: str
    eflags: str = ""
    sectype: str = ""

    @property
    def is_nvm_subsystem(self) -> bool:
        return self.subtype in ("nvme subsystem", "nvm subsystem")


@attrs.frozen
class ConnectedController:
    device: str  # "nvme0"
    subnqn: str

    @property
    def path(self) -> Path:
        return Path("/dev") / self.device


@attrs.frozen
class NvmeNamespaceDevice:
    """A block namespace ``nvme list`` shows."""

    device_path: str
    nsid: int
    model: str
    serial: str
    firmware: str
    used_bytes: int
    max_lba: int
    physical_size: int
    sector_size: int


@attrs.frozen
class NvmePath:
    name: str  # "nvme0"
    transport: str
    address: str  # "traddr=10.0.2.2,trsvcid=4420,src_addr=..."
    state: str  # "live", "connecting", ...

    @property
    def address_fields(self) -> dict[str, str]:
        return dict(
            part.split("=", 1) for part in self.address.replace(" ", ",").split(",") if "=" in part
        )


@attrs.frozen
class NvmeSubsystem:
    name: str
    nqn: str
    hostnqn: str
    paths: tuple[NvmePath, ...]


# --- parsing nvme-cli's JSON ------------------------------------------------------------------
def _load(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HostError(f"nvme {what}: output is not JSON: {text[:200]!r}") from exc


def parse_discover_json(text: str) -> list[DiscoveryRecord]:
    data = _load(text, "discover")
    return [
        DiscoveryRecord(
            trtype=str(r.get("trtype", "")),
            adrfam=str(r.get("adrfam", "")),
            subtype=str(r.get("subtype", "")),
            treq=str(r.get("treq", "")),
            portid=int(r.get("portid", 0)),
            trsvcid=str(r.get("trsvcid", "")).strip(),
            subnqn=str(r.get("subnqn", "")),
            traddr=str(r.get("traddr", "")).strip(),
            eflags=str(r.get("eflags", "")),
            sectype=str(r.get("sectype", "")),
        )
        for r in data.get("records", [])
    ]


def parse_list_json(text: str) -> list[NvmeNamespaceDevice]:
    """``nvme list -o json``: {"Devices": [{"NameSpace", "DevicePath", ...}]}."""
    data = _load(text, "list")
    return [
        NvmeNamespaceDevice(
            device_path=str(d.get("DevicePath", "")),
            nsid=int(d.get("NameSpace", 0)),
            model=str(d.get("ModelNumber", "")).strip(),
            serial=str(d.get("SerialNumber", "")).strip(),
            firmware=str(d.get("Firmware", "")).strip(),
            used_bytes=int(d.get("UsedBytes", 0)),
            max_lba=int(d.get("MaximumLBA", 0)),
            physical_size=int(d.get("PhysicalSize", 0)),
            sector_size=int(d.get("SectorSize", 0)),
        )
        for d in data.get("Devices", [])
    ]


def parse_list_subsys_json(text: str) -> list[NvmeSubsystem]:
    """``nvme list-subsys -o json``: nvme-cli 2.x gives a list of hosts, each with "Subsystems"
    (older releases a dict with "Subsystems"); both are accepted."""
    data = _load(text, "list-subsys")
    hosts = data if isinstance(data, list) else [data]
    out: list[NvmeSubsystem] = []
    for host in hosts:
        hostnqn = str(host.get("HostNQN", ""))
        for s in host.get("Subsystems", []):
            paths = tuple(
                NvmePath(
                    name=str(p.get("Name", "")),
                    transport=str(p.get("Transport", "")),
                    address=str(p.get("Address", "")),
                    state=str(p.get("State", "")),
                )
                for p in s.get("Paths", [])
            )
            out.append(
                NvmeSubsystem(
                    name=str(s.get("Name", "")), nqn=str(s.get("NQN", "")), hostnqn=hostnqn,
                    paths=paths,
                )
            )  # fmt: skip
    return out


def parse_connect_output(text: str, subnqn: str) -> ConnectedController:
    """``nvme connect -o json`` prints {"device": "nvme0"}; -o normal "device: nvme0"."""
    text = text.strip()
    if text.startswith("{"):
        device = str(_load(text, "connect").get("device", ""))
    else:
        match = re.search(r"(nvme\d+)", text)
        device = match.group(1) if match else ""
    if not device:
        raise HostError(f"nvme connect to {subnqn}: no device in its output {text!r}")
    return ConnectedController(device=device, subnqn=subnqn)


_DISCONNECTED = re.compile(r"disconnected (\d+) controller")


# --- the wrapper --------------------------------------------------------------------------------
class NvmeCli:
    """Runs nvme-cli; a failure raises ``NvmeCliError`` with nvme-cli's own message."""

    def __init__(
        self,
        nvme: str = "nvme",
        *,
        fabrics_device: Path = FABRICS_DEVICE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        try:
            import sh
        except ImportError as exc:
            raise NvmeCliMissing("the sh package is missing: pip install 'gpucache[host]'") from exc
        self._sh = sh
        try:
            self._nvme = sh.Command(nvme)
        except sh.CommandNotFound as exc:
            raise NvmeCliMissing(
                f"nvme-cli ({nvme}) is not installed: apt-get install nvme-cli"
            ) from exc
        self.fabrics_device = fabrics_device
        self.timeout = timeout

    def run(self, *args: str) -> str:
        """Run ``nvme ARGS``; its standard output."""
        sh = self._sh
        try:
            result = self._nvme(*args, _timeout=self.timeout, _err_to_out=False)
        except sh.ErrorReturnCode as exc:
            output = (exc.stderr or b"").decode(errors="replace") or (exc.stdout or b"").decode(
                errors="replace"
            )
            raise NvmeCliError(["nvme", *args], exc.exit_code, output) from exc
        except sh.TimeoutException as exc:
            raise NvmeCliError(["nvme", *args], -1, f"timed out after {self.timeout} s") from exc
        return str(result)

    def ensure_modules(self, transport: str = "tcp") -> None:
        """Load nvme-fabrics and the transport's module if /dev/nvme-fabrics is missing."""
        module = _TRANSPORT_MODULES.get(transport, f"nvme-{transport}")
        if self.fabrics_device.exists() and Path("/sys/module", module.replace("-", "_")).exists():
            return
        sh = self._sh
        try:
            sh.Command("modprobe")(module, _timeout=self.timeout)
        except (sh.CommandNotFound, sh.ErrorReturnCode) as exc:
            raise KernelModuleMissing(
                f"kernel module {module} (and nvme-fabrics) not loaded and modprobe failed: "
                f"{exc}; install the kernel's modules (linux-image-*) and run modprobe {module}"
            ) from exc
        if not self.fabrics_device.exists():
            raise KernelModuleMissing(f"{self.fabrics_device} missing after modprobe {module}")

    @staticmethod
    def _identity(hostnqn: str | None, hostid: str | None) -> list[str]:
        args: list[str] = []
        if hostnqn:
            args += ["--hostnqn", hostnqn]
        if hostid:
            args += ["--hostid", hostid]
        return args

    def discover(
        self,
        traddr: str,
        trsvcid: int | str = 8009,
        *,
        transport: str = "tcp",
        hostnqn: str | None = None,
        hostid: str | None = None,
    ) -> list[DiscoveryRecord]:
        self.ensure_modules(transport)
        out = self.run(
            "discover", "-t", transport, "-a", traddr, "-s", str(trsvcid),
            *self._identity(hostnqn, hostid), "-o", "json",
        )  # fmt: skip
        return parse_discover_json(out)

    def connect(
        self,
        subnqn: str,
        traddr: str,
        trsvcid: int | str = 4420,
        *,
        transport: str = "tcp",
        hostnqn: str | None = None,
        hostid: str | None = None,
        nr_io_queues: int | None = None,
        queue_size: int | None = None,
        header_digest: bool = False,
        data_digest: bool = False,
        keep_alive_tmo: int | None = None,
        ctrl_loss_tmo: int | None = None,
        disable_sqflow: bool = False,
    ) -> ConnectedController:
        """Connect the kernel host; the controller device (``nvme0``) it made."""
        self.ensure_modules(transport)
        args = ["connect", "-t", transport, "-a", traddr, "-s", str(trsvcid), "-n", subnqn]
        args += self._identity(hostnqn, hostid)
        if nr_io_queues is not None:
            args += ["--nr-io-queues", str(nr_io_queues)]
        if queue_size is not None:
            args += ["--queue-size", str(queue_size)]
        if keep_alive_tmo is not None:
            args += ["--keep-alive-tmo", str(keep_alive_tmo)]
        if ctrl_loss_tmo is not None:
            args += ["--ctrl-loss-tmo", str(ctrl_loss_tmo)]
        if header_digest:
            args.append("--hdr-digest")
        if data_digest:
            args.append("--data-digest")
        if disable_sqflow:
            args.append("--disable-sqflow")
        return parse_connect_output(self.run(*args, "-o", "json"), subnqn)

    def disconnect(self, subnqn: str) -> int:
        """Disconnect every controller of ``subnqn``; how many there were."""
        out = self.run("disconnect", "-n", subnqn)
        match = _DISCONNECTED.search(out)
        return int(match.group(1)) if match else 0

    def disconnect_device(self, device: str) -> None:
        self.run("disconnect", "-d", device.removeprefix("/dev/"))

    def list(self) -> list[NvmeNamespaceDevice]:
        return parse_list_json(self.run("list", "-o", "json"))

    def list_subsystems(self) -> builtins.list[NvmeSubsystem]:
        return parse_list_subsys_json(self.run("list-subsys", "-o", "json"))
