"""nvmeof.host: parsing nvme-cli 2.3's JSON (captured in the lab guest) and its clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmeof.host import NvmeCli, NvmeCliMissing
from nvmeof.host.nvme_cli import (
    HostError,
    KernelModuleMissing,
    parse_connect_output,
    parse_discover_json,
    parse_list_json,
    parse_list_subsys_json,
)

DISCOVER = """{
  "genctr":1,
  "records":[
    {"trtype":"tcp","adrfam":"ipv4","subtype":"nvme subsystem",
     "treq":"not specified, sq flow control disable supported","portid":1,"trsvcid":"14420",
     "subnqn":"nqn.2024-01.io.gpucache:kv0","traddr":"127.0.0.1","eflags":"none",
     "sectype":"none"},
    {"trtype":"tcp","adrfam":"ipv4","subtype":"current discovery subsystem",
     "treq":"not specified, sq flow control disable supported","portid":2,"trsvcid":"18009",
     "subnqn":"nqn.2014-08.org.nvmexpress.discovery","traddr":"127.0.0.1",
     "eflags":"explicit discovery connections, duplicate discovery information",
     "sectype":"none"}
  ]
}"""

LIST = """{
  "Devices":[
    {"NameSpace":2,"DevicePath":"/dev/nvme0n1","Firmware":"0.1.0",
     "ModelNumber":"GPUCache KV target","SerialNumber":"GPUCACHE0000000001",
     "UsedBytes":67108864,"MaximumLBA":131072,"PhysicalSize":67108864,"SectorSize":512}
  ]
}"""

LIST_SUBSYS = """[
  {"HostNQN":"nqn.2014-08.org.nvmexpress:uuid:6c616200-0000-4000-8000-000000000001",
   "HostID":"6c616200-0000-4000-8000-000000000001",
   "Subsystems":[{"Name":"nvme-subsys0","NQN":"nqn.2024-01.io.gpucache:kv0",
     "Paths":[{"Name":"nvme0","Transport":"tcp",
               "Address":"traddr=10.0.2.2,trsvcid=14420,src_addr=10.0.2.15","State":"live"}]}]}
]"""


def test_parse_discover() -> None:
    records = parse_discover_json(DISCOVER)
    assert [(r.subnqn, r.trsvcid, r.portid, r.is_nvm_subsystem) for r in records] == [
        ("nqn.2024-01.io.gpucache:kv0", "14420", 1, True),
        ("nqn.2014-08.org.nvmexpress.discovery", "18009", 2, False),
    ]
    assert records[0].trtype == "tcp"


def test_parse_list() -> None:
    (dev,) = parse_list_json(LIST)
    assert (dev.device_path, dev.nsid, dev.sector_size, dev.physical_size) == (
        "/dev/nvme0n1", 2, 512, 64 << 20,
    )  # fmt: skip
    assert dev.model == "GPUCache KV target"


def test_parse_list_subsys() -> None:
    (sub,) = parse_list_subsys_json(LIST_SUBSYS)
    assert sub.nqn == "nqn.2024-01.io.gpucache:kv0"
    (path,) = sub.paths
    assert path.state == "live"
    assert path.address_fields == {
        "traddr": "10.0.2.2", "trsvcid": "14420", "src_addr": "10.0.2.15",
    }  # fmt: skip
    # older nvme-cli: one host object rather than a list
    assert parse_list_subsys_json(LIST_SUBSYS.strip()[1:-1]) == [sub]


def test_parse_connect_output() -> None:
    assert parse_connect_output('{\n  "device":"nvme3"\n}\n', "nqn.x").device == "nvme3"
    assert parse_connect_output("device: nvme1\n", "nqn.x").path == Path("/dev/nvme1")
    with pytest.raises(HostError):
        parse_connect_output("", "nqn.x")
    with pytest.raises(HostError):
        parse_discover_json("Failed to write to /dev/nvme-fabrics")


def test_missing_nvme_cli_is_reported() -> None:
    with pytest.raises(NvmeCliMissing, match="apt-get install nvme-cli"):
        NvmeCli("/nonexistent/nvme")


def test_missing_modules_are_reported(tmp_path: Path) -> None:
    fake = tmp_path / "nvme"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    cli = NvmeCli(str(fake), fabrics_device=tmp_path / "no-nvme-fabrics")
    with pytest.raises(KernelModuleMissing):
        cli.ensure_modules("no-such-transport-xyz")
