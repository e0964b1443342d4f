"""What a namespace offers the target core: identify data and I/O command execution.

The core never knows which command set a namespace speaks; a KV namespace (``kvext.namespace``)
and a block namespace both implement this interface.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs

from nvmeof.transport.base import Buffer, ControllerChannel, Request


@attrs.frozen
class CommandResult:
    """A successful command's completion dwords and the data to send back with it."""

    dw0: int = 0
    dw1: int = 0
    data: Sequence[Buffer] = ()


@attrs.define
class NamespaceFeatures:
    """Per-namespace feature state a controller sees (Set/Get Features with an NSID)."""

    values: dict[int, int] = attrs.Factory(dict)


class Namespace(Protocol):
    nsid: int
    csi: int
    uuid: uuid.UUID

    def identify_namespace(self) -> bytes:
        """CNS 0x00: the NVM-shaped page (hosts drop a namespace whose NCAP is 0)."""

    def identify_csi_namespace(self) -> bytes:
        """CNS 0x05 for this namespace's command set."""

    def identify_csi_controller(self) -> bytes:
        """CNS 0x06 for this namespace's command set."""

    def io_command_effects(self) -> Mapping[int, int]:
        """Opcode -> Commands Supported and Effects bits, for log page 0x05."""

    def get_feature(self, fid: int) -> int | None:
        """A namespace-scoped feature's value, or None if the feature is not one of ours."""

    def set_feature(self, fid: int, value: int) -> bool:
        """Set a namespace-scoped feature; False if the feature is not one of ours."""

    async def execute(self, request: Request, channel: ControllerChannel) -> CommandResult:
        """Execute one I/O command; raise ``CommandError`` for a failure status."""

    def describe(self) -> dict[str, object]:
        """A JSON-able summary (for RPC and logs)."""
