"""SPDK's own RPC client (the ``spdk-rpc`` executable of the PyPI ``spdk`` package, unmodified)
drives a running ``gpucache target``: bdevs, a subsystem, namespaces, a listener, a host; our
initiator then does KV and block I/O; ``save_config`` restarts the target with ``--json``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvext.client import KVClient
from nvmeof.errors import NvmeError
from nvmeof.initiator.block import BlockNamespaceClient
from nvmeof.initiator.controller import Controller
from nvmeof.spec.admin import async_event_request_command
from nvmeof.spec.features import FeatureId, LogPageId, get_log_page_command, set_features_command
from nvmeof.spec.identify import (
    Cns,
    IdentifyController,
    identify_command,
    unpack_namespace_list,
)
from nvmeof.spec.status import FabricsStatus, StatusCodeType
from nvmeof.testing import RunningTarget, spawn_target

SPDK_RPC = shutil.which("spdk-rpc", path=os.path.dirname(sys.executable)) or shutil.which(
    "spdk-rpc"
)
if SPDK_RPC is None:  # a missing peer is a broken setup, not a reason to skip
    pytest.fail("spdk-rpc (the spdk package, in the dev extra) is not installed", pytrace=False)

SHAPES = Path(__file__).resolve().parents[3] / "shared" / "spdk"
NQN = "nqn.2016-06.io.spdk:cnode1"
HOST = "nqn.2014-08.org.nvmexpress:uuid:6c7a2a4e-0000-4000-8000-000000000001"
OTHER_HOST = "nqn.2014-08.org.nvmexpress:uuid:6c7a2a4e-0000-4000-8000-000000000002"
HOSTID = bytes(range(16))
TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rpc:
    """``spdk-rpc -s SOCKET ...`` as a subprocess."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        assert SPDK_RPC is not None
        return subprocess.run(
            [SPDK_RPC, "-s", str(self.sock), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def __call__(self, *args: str) -> Any:
        out = self.run(*args)
        assert out.returncode == 0, f"spdk-rpc {' '.join(args)}:\n{out.stdout}{out.stderr}"
        text = out.stdout.strip()
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return text  # print_json strips the quotes off a string result

    def error(self, *args: str) -> dict[str, Any]:
        """The JSON-RPC error object the client prints for a failed call."""
        out = self.run(*args)
        assert out.returncode != 0, out.stdout
        text = out.stdout
        return dict(json.loads(text[text.index("response:") + len("response:") :]))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Unix socket paths are short (108 bytes): keep it near the root of the temp dir.
    return tmp_path_factory.mktemp("rpc")


def empty_config(path: Path) -> Path:
    path.write_text(json.dumps({"subsystems": []}))
    return path


@pytest.fixture(scope="module")
def running(workdir: Path) -> Iterator[tuple[RunningTarget, Rpc]]:
    sock = workdir / "spdk.sock"
    config = empty_config(workdir / "empty.json")
    with spawn_target("--json", str(config), "-r", str(sock), "--no-discovery") as target:
        yield target, Rpc(sock)


@pytest.fixture(scope="module")
def built(running: tuple[RunningTarget, Rpc], workdir: Path) -> tuple[RunningTarget, Rpc, int]:
    """The SPDK tutorial's steps, with a KV bdev besides the block ones."""
    target, rpc = running
    aio_file = workdir / "aio.img"
    aio_file.write_bytes(bytes(4 << 20))
    port = free_port()
    rpc("framework_wait_init")
    rpc("nvmf_create_transport", "-t", "TCP")
    assert rpc("bdev_kvmalloc_create", "-b", "KV0", "-k", "16", "-v", "1048576") == "KV0"
    assert rpc("bdev_malloc_create", "-b", "Malloc0", "16", "512") == "Malloc0"
    assert rpc("bdev_aio_create", str(aio_file), "Aio0", "512") == "Aio0"
    rpc("nvmf_create_subsystem", NQN, "-s", "SPDK00000000000001", "-d", "GPUCache_Controller1")
    rpc("nvmf_subsystem_add_ns", NQN, "KV0")  # nsid 1, the first free one
    rpc("nvmf_subsystem_add_ns", NQN, "Malloc0")
    rpc("nvmf_subsystem_add_ns", "-n", "5", NQN, "Aio0")
    rpc("nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", str(port))
    rpc("nvmf_subsystem_add_host", NQN, HOST)
    return target, rpc, port


def connect(port: int, hostnqn: str = HOST) -> Any:
    return Controller.connect(
        ("127.0.0.1", port), NQN, hostnqn=hostnqn, hostid=HOSTID, timeout=TIMEOUT
    )


def test_version_and_methods(running: tuple[RunningTarget, Rpc]) -> None:
    _, rpc = running
    version = rpc("spdk_get_version")
    spdk = json.loads((SHAPES / "spdk_get_version.json").read_text())
    assert version.keys() == spdk.keys()
    assert version["fields"].keys() == spdk["fields"].keys()
    methods = set(rpc("rpc_get_methods"))
    assert {
        "spdk_get_version", "rpc_get_methods", "framework_wait_init", "bdev_malloc_create",
        "bdev_aio_create", "bdev_get_bdevs", "bdev_malloc_delete", "bdev_aio_delete",
        "bdev_kvmalloc_create", "bdev_kvmalloc_delete", "bdev_kvflash_create",
        "bdev_kvflash_delete", "nvmf_create_transport", "nvmf_get_transports",
        "nvmf_create_subsystem", "nvmf_delete_subsystem", "nvmf_subsystem_add_ns",
        "nvmf_subsystem_remove_ns", "nvmf_subsystem_add_listener",
        "nvmf_subsystem_remove_listener", "nvmf_subsystem_add_host",
        "nvmf_subsystem_remove_host", "nvmf_subsystem_allow_any_host", "nvmf_get_subsystems",
        "nvmf_get_stats", "save_config", "framework_get_config", "framework_get_subsystems",
    } <= methods  # fmt: skip
    assert "framework_start_init" not in set(rpc("rpc_get_methods", "--current"))


def test_kv_and_block_io_after_rpc_setup(built: tuple[RunningTarget, Rpc, int]) -> None:
    _, _, port = built

    async def main() -> None:
        async with connect(port) as ctrl:
            assert sorted(ctrl.namespaces) == [1, 2, 5]
            kv = KVClient(ctrl, 1)
            await kv.put(b"greeting", b"hello over SPDK RPC")
            assert await kv.get(b"greeting") == b"hello over SPDK RPC"
            for nsid in (2, 5):
                block = BlockNamespaceClient(ctrl, nsid)
                await block.identify()
                assert block.block_size == 512
                data = bytes([nsid]) * 4096
                await block.write(8, data)
                assert await block.read(8, 8) == data

    anyio.run(main)


def test_connect_refused_for_other_hosts_and_unlisted_addresses(
    built: tuple[RunningTarget, Rpc, int],
) -> None:
    target, _, port = built

    async def refused(address_port: int, hostnqn: str) -> None:
        with pytest.raises(NvmeError) as info:
            await connect(address_port, hostnqn)
        status = info.value.status
        assert (status.sct, status.sc) == (
            StatusCodeType.COMMAND_SPECIFIC,
            FabricsStatus.CONNECT_INVALID_HOST,
        )

    async def main() -> None:
        await refused(port, OTHER_HOST)  # not on the host list
        await refused(target.port, HOST)  # the target's --listen address is not the subsystem's

    anyio.run(main)


def test_get_subsystems_and_bdevs_have_spdk_shape(built: tuple[RunningTarget, Rpc, int]) -> None:
    _, rpc, port = built
    spdk = json.loads((SHAPES / "nvmf_get_subsystems.json").read_text())
    ours = rpc("nvmf_get_subsystems")
    assert [s["subtype"] for s in ours] == ["Discovery", "NVMe"]
    assert ours[0].keys() == spdk[0].keys()
    mine, theirs = ours[1], spdk[1]
    assert mine.keys() == theirs.keys()
    assert mine["listen_addresses"] == [
        {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}
    ]
    assert mine["listen_addresses"][0].keys() == theirs["listen_addresses"][0].keys()
    assert mine["hosts"] == [{"nqn": HOST}]
    assert mine["allow_any_host"] is False
    assert (mine["serial_number"], mine["model_number"]) == (
        "SPDK00000000000001",
        "GPUCache_Controller1",
    )
    assert [(n["nsid"], n["bdev_name"]) for n in mine["namespaces"]] == [
        (1, "KV0"),
        (2, "Malloc0"),
        (5, "Aio0"),
    ]
    for ns in mine["namespaces"]:
        assert ns.keys() == theirs["namespaces"][0].keys()
        assert ns["nguid"] == ns["uuid"].replace("-", "").upper()
    assert rpc("nvmf_get_subsystems", NQN) == [mine]

    spdk_bdev = json.loads((SHAPES / "bdev_get_bdevs.json").read_text())[0]
    bdevs = {b["name"]: b for b in rpc("bdev_get_bdevs")}
    assert set(bdevs) == {"KV0", "Malloc0", "Aio0"}
    for bdev in bdevs.values():
        assert bdev.keys() == spdk_bdev.keys()
        assert bdev["claimed"] is True
    assert bdevs["Malloc0"]["num_blocks"] == 16 << 11
    assert rpc("bdev_get_bdevs", "-b", "KV0") == [bdevs["KV0"]]
    transports = rpc("nvmf_get_transports")
    spdk_transport = json.loads((SHAPES / "nvmf_get_transports.json").read_text())[0]
    assert [t.keys() for t in transports] == [spdk_transport.keys()]
    stats = rpc("nvmf_get_stats")
    assert stats["poll_groups"][0]["transports"] == [{"trtype": "TCP"}]


def test_namespace_changes_raise_async_events(built: tuple[RunningTarget, Rpc, int]) -> None:
    _, rpc, port = built
    assert rpc("bdev_kvmalloc_create", "-b", "KV1") == "KV1"

    async def changed_list(ctrl: Controller) -> list[int]:
        page = bytearray(4096)
        command = get_log_page_command(LogPageId.CHANGED_NAMESPACES, 4096)
        await ctrl.admin.execute(command, into=[memoryview(page)])
        return unpack_namespace_list(page)

    async def event_after(ctrl: Controller, *rpc_args: str) -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, lambda: rpc(*rpc_args))
            completion = await ctrl.admin.execute(async_event_request_command(), timeout=TIMEOUT)
        return completion.dw0

    async def main() -> None:
        async with connect(port) as ctrl:
            ident = bytearray(4096)
            await ctrl.admin.execute(identify_command(Cns.CONTROLLER), into=[memoryview(ident)])
            assert IdentifyController.unpack(ident).oaes & 1 << 8
            await ctrl.admin.execute(
                set_features_command(FeatureId.ASYNC_EVENT_CONFIGURATION, 1 << 8)
            )
            dw0 = await event_after(ctrl, "nvmf_subsystem_add_ns", "-n", "7", NQN, "KV1")
            assert dw0 == 0x00040002  # notice, namespace attribute changed, log page 0x04
            assert await changed_list(ctrl) == [7]
            assert await changed_list(ctrl) == [], "the list clears when read"
            dw0 = await event_after(ctrl, "nvmf_subsystem_remove_ns", NQN, "7")
            assert dw0 == 0x00040002
            assert await changed_list(ctrl) == [7]

    anyio.run(main)
    assert [n["nsid"] for n in rpc("nvmf_get_subsystems", NQN)[0]["namespaces"]] == [1, 2, 5]
    assert rpc("bdev_kvmalloc_delete", "KV1") is None


def test_errors_have_spdk_codes(built: tuple[RunningTarget, Rpc, int]) -> None:
    _, rpc, _ = built
    # a method SPDK's client knows and this target does not serve
    assert rpc.error("bdev_null_create", "Null0", "8", "512") == {
        "code": -32601,
        "message": "Method not found",
    }
    assert rpc.error("bdev_malloc_delete", "NoSuchBdev") == {
        "code": -19,
        "message": "No such device",
    }
    assert rpc.error("bdev_malloc_create", "-b", "Malloc0", "1", "512")["code"] == -17
    assert rpc.error("nvmf_subsystem_add_ns", NQN, "NoSuchBdev") == {
        "code": -32603,
        "message": "Invalid parameters",
    }
    missing = "nqn.2016-06.io.spdk:nothing"
    assert rpc.error("nvmf_subsystem_add_host", missing, HOST) == {
        "code": -32602,
        "message": f"Unable to find subsystem with NQN {missing}",
    }
    assert rpc.error("nvmf_create_subsystem", NQN)["message"] == f"Unable to create subsystem {NQN}"
    assert rpc.error("nvmf_create_transport", "-t", "TCP")["message"] == (
        "Transport type 'TCP' already exists"
    )
    flash = rpc.error(  # not a command of SPDK's client: through its plugin hook
        "--plugin", "kvext.rpc", "bdev_kvflash_create", "-b", "F0", "/nonexistent/dir/f.img"
    )
    assert flash["code"] in (-2, -22, -32603)


def test_save_config_restart_with_json(workdir: Path) -> None:
    sock = workdir / "restart.sock"
    aio_file = workdir / "restart.img"
    aio_file.write_bytes(bytes(1 << 20))
    port = free_port()
    script = "\n".join(
        [
            "nvmf_create_transport -t TCP",
            "bdev_kvmalloc_create -b KV0 -v 65536",
            f"bdev_aio_create {aio_file} Aio0 512",
            f"nvmf_create_subsystem {NQN} -s SN0001 -d Model0",
            f"nvmf_subsystem_add_ns {NQN} KV0",
            f"nvmf_subsystem_add_ns {NQN} Aio0",
            f"nvmf_subsystem_add_listener {NQN} -t tcp -a 127.0.0.1 -s {port}",
            f"nvmf_subsystem_add_host {NQN} {HOST}",
        ]
    )
    data = bytes(range(256)) * 8
    config = workdir / "saved.json"
    empty = empty_config(workdir / "e.json")
    with spawn_target("--json", str(empty), "-r", str(sock), "--no-discovery"):
        rpc = Rpc(sock)
        out = rpc.run(stdin=script)  # spdk-rpc reads commands from stdin, one per line
        assert out.returncode == 0, out.stdout + out.stderr
        before = rpc("nvmf_get_subsystems")

        async def write() -> None:
            async with connect(port) as ctrl:
                await KVClient(ctrl, 1).put(b"k", b"lost on restart")
                block = BlockNamespaceClient(ctrl, 2)
                await block.identify()
                await block.write(100, data)

        anyio.run(write)
        saved = rpc.run("save_config")
        assert saved.returncode == 0, saved.stderr
        config.write_text(saved.stdout)

    sections = {s["subsystem"]: s["config"] for s in json.loads(config.read_text())["subsystems"]}
    assert [e["method"] for e in sections["bdev"]] == ["bdev_kvmalloc_create", "bdev_aio_create"]
    with spawn_target("--json", str(config), "-r", str(sock), "--no-discovery"):
        rpc = Rpc(sock)
        assert rpc("nvmf_get_subsystems") == before

        async def read() -> None:
            async with connect(port) as ctrl:
                assert not await KVClient(ctrl, 1).exists(b"k"), (
                    "DRAM KV data goes with the process"
                )
                block = BlockNamespaceClient(ctrl, 2)
                await block.identify()
                assert await block.read(100, len(data) // 512) == data

        anyio.run(read)


def test_bad_json_config_names_the_entry(workdir: Path) -> None:
    config = workdir / "bad.json"
    config.write_text(
        json.dumps(
            {
                "subsystems": [
                    {"subsystem": "sock", "config": [{"method": "sock_set_default_impl"}]},
                    {
                        "subsystem": "nvmf",
                        "config": [
                            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
                            {
                                "method": "nvmf_subsystem_add_ns",
                                "params": {"nqn": NQN, "namespace": {"bdev_name": "Nope"}},
                            },
                        ],
                    },
                ]
            }
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "nvmeof.cli",
        "target",
        "-c",
        str(config),
        "-r",
        str(workdir / "b.sock"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert "cannot start the target" in out.stderr
    assert "Traceback" not in out.stderr
    assert 'subsystem "nvmf" entry 1 (nvmf_subsystem_add_ns)' in out.stderr
    assert f"Unable to find subsystem with NQN {NQN}" in out.stderr
