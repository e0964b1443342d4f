"""The cluster map: which targets make up an erasure-coded cluster, and how values are coded.

A JSON file::

    {
      "k": 4, "m": 2,                      # optional: data and parity fragments (default 4+2)
      "write_quorum": 5,                   # optional: fragments a put must store (default k+1)
      "replicate_below": 65536,            # optional: smaller values are replicated m+1 times
      "targets": [
        {"name": "t0", "address": "10.0.0.1:4420", "subnqn": "nqn...:kv0", "weight": 1.0},
        ...
      ],
      "discovery": ["10.0.0.9:8009"]       # optional: discovery controllers (not used yet)
    }

``name`` is what placement hashes: keep it when a target is replaced at another address, and its
values stay where they are (default: the address). ``weight`` (or ``capacity``, a size such as
``"64GiB"``, which counts as its GiB) makes a target hold a proportional share of fragments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs

from ec.codec import DEFAULT_REPLICATE_BELOW
from ec.placement import Member
from nvmeof.errors import NvmeofError
from nvmeof.units import parse_size

DEFAULT_NQN = "nqn.2024-01.io.gpucache:kv0"


class ClusterMapError(NvmeofError, ValueError):
    """A cluster file is missing, not JSON, or describes an impossible cluster."""


@attrs.frozen
class TargetEntry:
    name: str
    host: str
    port: int
    subnqn: str = DEFAULT_NQN
    weight: float = 1.0

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def member(self) -> Member:
        return Member(self.name, self.weight)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": f"{self.host}:{self.port}",
            "subnqn": self.subnqn,
            "weight": self.weight,
        }


@attrs.frozen
class ClusterMap:
    targets: tuple[TargetEntry, ...]
    k: int = 4
    m: int = 2
    write_quorum: int | None = None
    replicate_below: int = DEFAULT_REPLICATE_BELOW
    discovery: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ClusterMapError(f"target names repeat: {names}")
        if self.k < 1 or self.m < 0:
            raise ClusterMapError(f"k={self.k}, m={self.m}: need k >= 1 and m >= 0")
        if not self.k <= self.quorum <= self.k + self.m:
            raise ClusterMapError(
                f"write quorum {self.quorum} is outside k..k+m ({self.k}..{self.k + self.m})"
            )

    @property
    def quorum(self) -> int:
        return (
            self.write_quorum if self.write_quorum is not None else min(self.k + 1, self.k + self.m)
        )

    def target(self, name: str) -> TargetEntry:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    # --- JSON -------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: Any) -> ClusterMap:
        from nvmeof.initiator.controller import parse_address

        if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
            raise ClusterMapError('a cluster map is a JSON object with a "targets" list')
        targets = []
        for i, raw in enumerate(data["targets"]):
            if not isinstance(raw, dict) or "address" not in raw:
                raise ClusterMapError(f"target {i}: an object with an address is needed")
            try:
                host, port = parse_address(str(raw["address"]))
                weight = float(raw.get("weight", 1.0))
                if "capacity" in raw and "weight" not in raw:
                    weight = parse_size(str(raw["capacity"])) / (1 << 30)
            except ValueError as exc:
                raise ClusterMapError(f"target {i}: {exc}") from exc
            if not weight > 0:
                raise ClusterMapError(f"target {i}: weight must be positive")
            targets.append(
                TargetEntry(
                    name=str(raw.get("name") or f"{host}:{port}"),
                    host=host,
                    port=port,
                    subnqn=str(raw.get("subnqn", DEFAULT_NQN)),
                    weight=weight,
                )
            )
        try:
            return cls(
                targets=tuple(targets),
                k=int(data.get("k", 4)),
                m=int(data.get("m", 2)),
                write_quorum=None
                if data.get("write_quorum") is None
                else int(data["write_quorum"]),
                replicate_below=int(data.get("replicate_below", DEFAULT_REPLICATE_BELOW)),
                discovery=tuple(str(d) for d in data.get("discovery", ())),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ClusterMapError):
                raise
            raise ClusterMapError(str(exc)) from exc

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "k": self.k,
            "m": self.m,
            "replicate_below": self.replicate_below,
            "targets": [t.to_json() for t in self.targets],
        }
        if self.write_quorum is not None:
            out["write_quorum"] = self.write_quorum
        if self.discovery:
            out["discovery"] = list(self.discovery)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterMap:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ClusterMapError(f"cannot read cluster map {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClusterMapError(f"cluster map {path} is not JSON: {exc}") from exc
        return cls.from_json(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
