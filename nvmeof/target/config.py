"""SPDK's JSON config (``nvmf_tgt --json``, ``save_config``'s output): read it, apply it.

The file is ``{"subsystems": [{"subsystem": NAME, "config": [{"method": ..., "params": ...}]}]}``.
The ``keyring``, ``bdev`` and ``nvmf`` sections are replayed in file order through the same RPC
methods a client would call; a bad entry stops the start with an error naming it. A config SPDK
itself saved also carries sections and tuning methods GPUCache has no counterpart for (``sock``,
``iobuf``, ``accel``, ``bdev_set_options``, ``nvmf_set_config``, ...): those are skipped and listed
in the log, so such a file loads as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from nvmeof.target.rpc import RpcError

if TYPE_CHECKING:
    from nvmeof.target.app import TargetApp

log = logging.getLogger("nvmeof.target.config")

APPLIED_SECTIONS = frozenset({"keyring", "bdev", "nvmf"})

# SPDK methods that only tune SPDK's own machinery; GPUCache has nothing they would change.
TUNING_METHODS = frozenset(
    {
        "bdev_set_options",
        "bdev_wait_for_examine",
        "bdev_raid_set_options",
        "bdev_nvme_set_options",
        "bdev_nvme_set_hotplug",
        "bdev_iscsi_set_options",
        "nvmf_set_config",
        "nvmf_set_max_subsystems",
        "nvmf_set_crdt",
    }
)


class ConfigError(ValueError):
    """The config cannot be applied; the message names the file and the entry."""


@attrs.frozen
class ConfigEntry:
    section: str
    index: int  # position in the section's config list
    method: str
    params: object = None

    def where(self) -> str:
        return f'subsystem "{self.section}" entry {self.index} ({self.method})'


@attrs.frozen
class JsonConfig:
    source: str
    entries: tuple[ConfigEntry, ...]
    skipped: tuple[str, ...] = ()  # "section: method" of what is not applied


def parse_config(data: object, *, source: str = "config") -> JsonConfig:
    """Check the shape and sort the entries into applied and skipped; nothing runs yet."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{source}: {what}")

    if not isinstance(data, dict) or not isinstance(data.get("subsystems"), list):
        raise bad('not an SPDK JSON config: expected {"subsystems": [...]}')
    entries: list[ConfigEntry] = []
    skipped: list[str] = []
    for i, section in enumerate(data["subsystems"]):
        if not isinstance(section, dict) or not isinstance(section.get("subsystem"), str):
            raise bad(f'subsystems[{i}] has no "subsystem" name')
        name = section["subsystem"]
        config = section.get("config")
        if config is None:
            config = []
        if not isinstance(config, list):
            raise bad(f'subsystem "{name}": "config" must be a list')
        for j, item in enumerate(_flatten(config)):
            if not isinstance(item, dict) or not isinstance(item.get("method"), str):
                raise bad(
                    f'subsystem "{name}" entry {j}: expected {{"method": ..., "params": ...}}'
                )
            unknown = set(item) - {"method", "params"}
            if unknown:
                raise bad(f'subsystem "{name}" entry {j}: unexpected keys {sorted(unknown)}')
            method = item["method"]
            if name not in APPLIED_SECTIONS or method in TUNING_METHODS:
                skipped.append(f"{name}: {method}")
                continue
            entries.append(ConfigEntry(name, j, method, item.get("params")))
    return JsonConfig(source, tuple(entries), tuple(skipped))


def _flatten(config: Iterable[object]) -> Iterable[object]:
    # save_config --with-batches nests a batch of entries in a list
    for item in config:
        if isinstance(item, list):
            yield from item
        else:
            yield item


def load_config_file(path: str | Path) -> JsonConfig:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from exc
    return parse_config(data, source=source)


async def apply_config(app: TargetApp, config: JsonConfig) -> None:
    """Replay each entry through ``app``'s RPC methods, in order; stop at the first failure."""
    if config.skipped:
        log.info(
            "%s: skipped %d entries with no GPUCache counterpart: %s",
            config.source,
            len(config.skipped),
            ", ".join(config.skipped),
        )
    for entry in config.entries:
        if entry.method not in app.methods:
            raise ConfigError(f"{config.source}: {entry.where()}: unknown method {entry.method}")
        try:
            await app.call(entry.method, entry.params, check_state=False)
        except RpcError as exc:
            detail = f" ({exc.detail})" if exc.detail else ""
            raise ConfigError(f"{config.source}: {entry.where()}: {exc.message}{detail}") from exc
    log.info("%s: applied %d entries", config.source, len(config.entries))
