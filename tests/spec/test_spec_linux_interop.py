"""Bytes a real Linux kernel forced (tests/interop/test_kernel_*.py found each)."""

from __future__ import annotations

import pytest

from nvmeof.spec.command import Command
from nvmeof.spec.fabrics import (
    connect_command,
    disconnect_command,
    property_get_command,
    property_set_command,
)


@pytest.mark.parametrize(
    "command",
    [
        connect_command(qid=0, sqsize=31, kato_ms=0),
        connect_command(qid=1, sqsize=127, kato_ms=0),
        property_get_command(0x0, size=8),
        property_set_command(0x14, 0x460001),
        disconnect_command(),
    ],
    ids=["connect-admin", "connect-io", "property-get", "property-set", "disconnect"],
)
def test_fabrics_commands_say_psdt_sgl(command: Command) -> None:
    # Linux 6.12 nvmet_req_init: (flags & NVME_CMD_SGL_ALL) != NVME_CMD_SGL_METABUF -> Invalid
    # Field, for fabrics commands too; with byte 1 = 0 our Connect to nvmet-tcp was refused.
    raw = command.to_bytes()
    assert raw[0] == 0x7F
    assert raw[1] == 0x40
