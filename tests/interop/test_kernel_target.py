"""Our initiator against Linux 6.12's NVMe/TCP target (nvmet-tcp in the lab guest, configured
through configfs with a memory-backed null_blk namespace), reached through a QEMU host forward.
Also: nvmeof.host (the nvme-cli wrapper) run inside the guest against our target."""

from __future__ import annotations

import os
from collections.abc import Iterator

import anyio
import pytest

from nvmeof.initiator.block import BlockNamespaceClient
from nvmeof.initiator.controller import Controller
from nvmeof.initiator.discovery import discover
from nvmeof.spec.discovery import SubsystemType, TransportType
from nvmeof.spec.identify import ControllerType
from tests.interop.conftest import GUEST_NVMET_PORT, NVMET_NQN, Lab, LabTarget
from tools.lab.guest import GUEST_HOST_ADDRESS

pytestmark = [pytest.mark.lab, pytest.mark.anyio]

TIMEOUT = 120.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def nvmet(lab: Lab) -> Iterator[tuple[str, int]]:
    """The guest's nvmet subsystem, as (host, port) reachable from here."""
    lab.guest.run(f"sh /src/tools/lab/nvmet-setup.sh {NVMET_NQN} {GUEST_NVMET_PORT}", check=True)
    yield "127.0.0.1", lab.nvmet_port
    lab.guest.run("sh /src/tools/lab/nvmet-setup.sh --clear", timeout=60)


async def test_discover_nvmet(nvmet: tuple[str, int]) -> None:
    with anyio.fail_after(TIMEOUT):
        entries = await discover(nvmet, timeout=30)
    by_type = {e.subtype: e for e in entries}
    entry = by_type[SubsystemType.NVM]
    assert entry.subnqn == NVMET_NQN
    assert entry.trtype == TransportType.TCP
    assert entry.trsvcid == str(GUEST_NVMET_PORT)
    assert by_type[SubsystemType.CURRENT_DISCOVERY].subnqn.startswith("nqn.2014-08.org.nvmexpress")


@pytest.mark.parametrize(
    ("header_digest", "data_digest", "io_queues"),
    [(False, False, 1), (True, True, 2), (False, True, 3)],
    ids=["plain-1q", "digests-2q", "data-digest-3q"],
)
async def test_block_io_against_nvmet(
    nvmet: tuple[str, int], header_digest: bool, data_digest: bool, io_queues: int
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with Controller.connect(
            nvmet,
            NVMET_NQN,
            io_queues=io_queues,
            header_digest=header_digest,
            data_digest=data_digest,
            timeout=30,
        ) as ctrl:
            assert ctrl.identify is not None
            assert ctrl.identify.cntrltype == ControllerType.IO
            assert ctrl.identify.subnqn == NVMET_NQN
            assert len(ctrl.io_queues) == io_queues
            assert sorted(ctrl.namespaces) == [1]
            client = BlockNamespaceClient(ctrl, 1)
            ident = await client.identify()
            assert ident.nsze == client.num_blocks > 0
            # a spread of sizes: in-capsule, one R2T, several data PDUs; on every queue
            pattern = os.urandom(1 << 20)
            async with anyio.create_task_group() as tg:
                for i, size in enumerate([512, 4096, 8192 + 512, 128 << 10, 1 << 20]):
                    lba = i * (2 << 20) // client.block_size
                    tg.start_soon(client.write, lba, pattern[:size])
            for i, size in enumerate([512, 4096, 8192 + 512, 128 << 10, 1 << 20]):
                lba = i * (2 << 20) // client.block_size
                assert bytes(await client.read(lba, size // client.block_size)) == pattern[:size]
            await client.flush()


def test_host_wrapper_in_the_guest(lab: Lab, lab_target: LabTarget) -> None:
    """nvmeof.host drives the guest's real nvme-cli: discover, connect, list, disconnect."""
    rt = lab_target
    script = f"""
import json
from nvmeof.host import NvmeCli
cli = NvmeCli()
records = cli.discover("{GUEST_HOST_ADDRESS}", {rt.discovery_port})
ctrl = cli.connect("{rt.nqn}", "{GUEST_HOST_ADDRESS}", {rt.io_port}, nr_io_queues=2,
                   header_digest=True, keep_alive_tmo=10)
import time
for _ in range(100):
    devices = cli.list()
    if devices:
        break
    time.sleep(0.1)
subsystems = cli.list_subsystems()
count = cli.disconnect("{rt.nqn}")
print(json.dumps({{
    "records": [[r.subnqn, r.trsvcid, r.is_nvm_subsystem] for r in records],
    "device": ctrl.device,
    "devices": [[d.nsid, d.sector_size, d.physical_size] for d in devices],
    "paths": [[s.nqn, p.state, p.address_fields.get("trsvcid")]
              for s in subsystems for p in s.paths],
    "disconnected": count,
}}))
"""
    site = "/src/.venv/lib/python3.11/site-packages"
    result = lab.guest.run(
        f"cd /tmp && PYTHONPATH=/src:{site} python3 - <<'EOF'\n{script}\nEOF", timeout=120
    )
    assert result.returncode == 0, result.output
    import json

    out = json.loads(result.output.strip().splitlines()[-1])
    assert [rt.nqn, str(rt.io_port), True] in out["records"]
    assert out["device"].startswith("nvme")
    assert out["devices"] == [[2, 512, 64 << 20]]
    assert out["paths"] == [[rt.nqn, "live", str(rt.io_port)]]
    assert out["disconnected"] == 1
