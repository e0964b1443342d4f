"""DH-HMAC-CHAP through the SPDK RPCs: keyring_file_add_key, nvmf_subsystem_add_host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvext.rpc import register_kv_methods
from nvmeof.spec.dhchap import DhchapSecret
from nvmeof.target.app import TargetApp
from nvmeof.target.rpc import RpcError
from nvmeof.target.rpc_methods import core_methods

pytestmark = pytest.mark.anyio

NQN = "nqn.2016-06.io.spdk:cnode1"
HOST = "nqn.2014-08.org.nvmexpress:uuid:0c1e3f5a-8d21-4b7e-9f0a-2a3b4c5d6e7f"


async def started_app() -> TargetApp:
    app = TargetApp(methods=register_kv_methods(core_methods()))
    return app


def key_file(tmp_path: Path, name: str, secret: DhchapSecret, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(str(secret) + "\n")
    os.chmod(path, mode)
    return str(path)


async def test_add_host_with_keyring_names_and_literal_secrets(tmp_path: Path) -> None:
    host_secret = DhchapSecret.generate()
    ctrl_secret = DhchapSecret.generate(48, transform=2)
    app = await started_app()
    async with app.running():
        await app.call("framework_start_init", None)
        await app.call("nvmf_create_subsystem", {"nqn": NQN})
        await app.call(
            "keyring_file_add_key", {"name": "key0", "path": key_file(tmp_path, "k0", host_secret)}
        )
        await app.call(
            "keyring_file_add_key", {"name": "ckey0", "path": key_file(tmp_path, "c0", ctrl_secret)}
        )
        await app.call(
            "nvmf_subsystem_add_host",
            {"nqn": NQN, "host": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"},
        )
        config = app.target.subsystems[NQN].auth_config(HOST)
        assert config is not None
        assert config.host_key == host_secret
        assert config.ctrl_key == ctrl_secret
        subsystems = await app.call("nvmf_get_subsystems", None)
        hosts = next(s for s in subsystems if s["nqn"] == NQN)["hosts"]  # type: ignore[union-attr, index]
        assert hosts == [{"nqn": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"}]
        saved = app.save_config()
        sections = [s["subsystem"] for s in saved["subsystems"]]  # type: ignore[attr-defined]
        assert sections.index("keyring") < sections.index("nvmf")

        other = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
        literal = DhchapSecret.generate(64, transform=3)
        await app.call(
            "nvmf_subsystem_add_host", {"nqn": NQN, "host": other, "dhchap_key": str(literal)}
        )
        assert app.target.subsystems[NQN].auth_config(other) == type(config)(host_key=literal)

        with pytest.raises(RpcError, match="Could not find key"):
            await app.call(
                "nvmf_subsystem_add_host", {"nqn": NQN, "host": other, "dhchap_key": "nope"}
            )
        with pytest.raises(RpcError, match="needs dhchap_key"):
            await app.call(
                "nvmf_subsystem_add_host", {"nqn": NQN, "host": other, "dhchap_ctrlr_key": "ckey0"}
            )
        await app.call("nvmf_subsystem_remove_host", {"nqn": NQN, "host": HOST})
        assert app.target.subsystems[NQN].auth_config(HOST) is None


async def test_keyring_refuses_readable_or_bad_files(tmp_path: Path) -> None:
    app = await started_app()
    async with app.running():
        with pytest.raises(RpcError, match="0600"):
            await app.call(
                "keyring_file_add_key",
                {"name": "k", "path": key_file(tmp_path, "k", DhchapSecret.generate(), 0o644)},
            )
        bad = tmp_path / "bad"
        bad.write_text("DHHC-1:01:bm90IGEga2V5:\n")
        os.chmod(bad, 0o600)
        with pytest.raises(RpcError):
            await app.call("keyring_file_add_key", {"name": "k", "path": str(bad)})
        assert await app.call("keyring_get_keys", None) == []
