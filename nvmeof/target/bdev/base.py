"""What the target knows of a bdev: a named backing that can make a namespace of itself.

Block bdevs (malloc, aio) make NVM namespaces; KV bdevs (``kvext``: DRAM or flash KV engines) make
KV namespaces. The target core, the JSON config and the RPC server only see this interface, so the
core never imports a command set (an import-linter contract holds that line).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Protocol

from nvmeof.target.namespace import Namespace


class Bdev(Protocol):
    name: str
    uuid: uuid.UUID

    def make_namespace(self) -> Namespace:
        """A namespace serving this bdev (one per subsystem it is added to)."""

    def describe(self) -> dict[str, object]:
        """One entry of ``bdev_get_bdevs``, in SPDK's shape (see ../shared/spdk/)."""

    def config_entry(self) -> dict[str, object]:
        """The ``{"method": ..., "params": ...}`` that recreates it (``save_config``)."""

    async def aclose(self) -> None: ...


class BdevExists(ValueError):
    pass


class BdevNotFound(KeyError):
    pass


class BdevRegistry:
    """Bdevs by name, in creation order (SPDK's ``save_config`` replays them in that order)."""

    def __init__(self) -> None:
        self._bdevs: dict[str, Bdev] = {}

    def add(self, bdev: Bdev) -> Bdev:
        if bdev.name in self._bdevs:
            raise BdevExists(f"bdev {bdev.name} already exists")
        self._bdevs[bdev.name] = bdev
        return bdev

    def get(self, name: str) -> Bdev:
        try:
            return self._bdevs[name]
        except KeyError:
            raise BdevNotFound(name) from None

    def remove(self, name: str) -> Bdev:
        return self._bdevs.pop(self.get(name).name)

    def __iter__(self) -> Iterator[Bdev]:
        return iter(list(self._bdevs.values()))

    def __len__(self) -> int:
        return len(self._bdevs)
