"""SPDK's JSON config and the JSON-RPC core, in process: parsing, applying, saving, framing."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kvext.rpc import register_kv_methods
from nvmeof.target.app import TargetApp
from nvmeof.target.config import ConfigError, apply_config, load_config_file, parse_config
from nvmeof.target.rpc import JsonStream, JsonStreamError, RpcError, RpcState, answer
from nvmeof.target.rpc_methods import core_methods

pytestmark = pytest.mark.anyio

SPDK_CONFIG = Path(__file__).resolve().parents[3] / "shared" / "spdk" / "nvmf_tgt-save_config.json"
NQN = "nqn.2016-06.io.spdk:cnode1"


def spdk_config(*, port: str = "0") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SPDK_CONFIG.read_text())
    for section in data["subsystems"]:
        for entry in section["config"]:
            if entry["method"] == "nvmf_subsystem_add_listener":
                entry["params"]["listen_address"]["trsvcid"] = port
    return data


def new_app() -> TargetApp:
    return TargetApp(methods=register_kv_methods(core_methods()))


def test_spdk_saved_config_parses_and_skips_what_has_no_counterpart() -> None:
    config = load_config_file(SPDK_CONFIG)
    assert [e.method for e in config.entries] == [
        "bdev_malloc_create",
        "nvmf_create_transport",
        "nvmf_create_subsystem",
        "nvmf_subsystem_add_host",
        "nvmf_subsystem_add_ns",
        "nvmf_subsystem_add_listener",
    ]
    assert "sock: sock_impl_set_options" in config.skipped
    assert "bdev: bdev_nvme_set_options" in config.skipped
    assert "nvmf: nvmf_set_config" in config.skipped


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "not an SPDK JSON config"),
        ({"subsystems": [{"config": []}]}, 'subsystems[0] has no "subsystem"'),
        ({"subsystems": [{"subsystem": "bdev", "config": {}}]}, '"config" must be a list'),
        ({"subsystems": [{"subsystem": "bdev", "config": [{"params": {}}]}]}, "entry 0"),
    ],
)
def test_malformed_configs_are_refused(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.json: ") as info:
        parse_config(data, source="cfg.json")
    assert message in str(info.value)


def test_unreadable_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(bad)


async def test_apply_save_apply_gives_the_same_state() -> None:
    app = new_app()
    async with app.running():
        await apply_config(app, parse_config(spdk_config()))
        await app.start()
        subsystems = await app.call("nvmf_get_subsystems")
        saved = await app.call("save_config")
    assert isinstance(subsystems, list)
    mine = subsystems[1]
    assert mine["nqn"] == NQN
    assert mine["hosts"] == [
        {"nqn": "nqn.2014-08.org.nvmexpress:uuid:6c7a2a4e-0000-4000-8000-000000000001"}
    ]
    assert mine["namespaces"][0]["uuid"] == "d36f4b55-b880-45ce-a878-f8ecb6030635"
    assert mine["namespaces"][0]["nguid"] == "D36F4B55B88045CEA878F8ECB6030635"
    port = mine["listen_addresses"][0]["trsvcid"]
    assert port != "0", "the port the system chose is what is reported and saved"

    again = new_app()
    async with again.running():
        await apply_config(again, parse_config(copy.deepcopy(saved)))
        assert await again.call("nvmf_get_subsystems", check_state=False) == subsystems
        assert await again.call("save_config", check_state=False) == saved


async def test_failing_entry_is_named() -> None:
    data = {
        "subsystems": [
            {"subsystem": "bdev", "config": [{"method": "bdev_kvmalloc_create", "params": {}}]},
            {
                "subsystem": "nvmf",
                "config": [
                    {"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
                    {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "bogus": 1}},
                ],
            },
        ]
    }
    app = new_app()
    async with app.running():
        with pytest.raises(ConfigError) as info:
            await apply_config(app, parse_config(data, source="x.json"))
    assert str(info.value).startswith(
        'x.json: subsystem "nvmf" entry 1 (nvmf_subsystem_add_ns): Invalid parameters'
    )
    assert "bogus" in str(info.value)


async def test_unknown_method_in_an_applied_section_is_named() -> None:
    data = {"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_null_create"}]}]}
    app = new_app()
    async with app.running():
        with pytest.raises(ConfigError, match=r'"bdev" entry 0 .*unknown method'):
            await apply_config(app, parse_config(data))


async def test_flash_method_is_registered() -> None:
    app = new_app()
    async with app.running():
        await app.start()
        with pytest.raises(RpcError) as info:
            await app.call("bdev_kvflash_create", {"name": "F0", "filename": "/nonexistent/x"})
    assert info.value.code in (-2, -22, -32603)


# --- the JSON-RPC core -----------------------------------------------------------------------
def test_json_stream_splits_back_to_back_values_across_chunks() -> None:
    stream = JsonStream()
    text = b'{"a": "}{\\"x"}\n{"b": [1, {"c": 2}]}[{"d": 3}]'
    got: list[object] = []
    for i in range(len(text)):
        got += list(stream.feed(text[i : i + 1]))
    assert got == [{"a": '}{"x'}, {"b": [1, {"c": 2}]}, [{"d": 3}]]
    with pytest.raises(JsonStreamError):
        list(JsonStream().feed(b"42 "))


async def test_answers_carry_spdk_error_codes() -> None:
    app = new_app()

    async def dispatch(method: str, params: object) -> object:
        return await app.call(method, params)

    async with app.running():
        unknown = await answer({"jsonrpc": "2.0", "id": 1, "method": "nope"}, dispatch)
        assert unknown == {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {"code": -32601, "message": "Method not found"},
        }
        early = await answer({"jsonrpc": "2.0", "id": 2, "method": "bdev_get_bdevs"}, dispatch)
        assert isinstance(early, dict)
        assert early["error"]["code"] == -1, "runtime methods wait for framework_start_init"
        assert app.state == RpcState.STARTUP
        started = await answer(
            {"jsonrpc": "2.0", "id": 3, "method": "framework_start_init"}, dispatch
        )
        assert started == {"jsonrpc": "2.0", "id": 3, "result": True}
        bad = await answer(
            {"jsonrpc": "2.0", "id": 4, "method": "nvmf_create_subsystem", "params": {"x": 1}},
            dispatch,
        )
        assert isinstance(bad, dict)
        assert bad["error"] == {"code": -32602, "message": "Invalid parameters"}
        version = await answer(
            {"jsonrpc": "2.0", "id": 5, "method": "spdk_get_version", "params": {"x": 1}},
            dispatch,
        )
        assert isinstance(version, dict)
        assert version["error"]["message"] == "spdk_get_version method requires no parameters"
        invalid = await answer({"id": 6, "method": "spdk_get_version"}, dispatch)
        assert invalid == {
            "jsonrpc": "2.0",
            "id": 6,
            "error": {"code": -32600, "message": "Invalid request"},
        }
        batch = await answer(
            [
                {"jsonrpc": "2.0", "id": 7, "method": "framework_wait_init"},
                {"jsonrpc": "2.0", "method": "framework_wait_init"},  # a notification
            ],
            dispatch,
        )
        assert batch == [{"jsonrpc": "2.0", "id": 7, "result": True}]
