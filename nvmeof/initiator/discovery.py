"""Discovery from the host side: connect to a discovery controller and read its log (0x70).

The read follows libnvme (``nvme_discovery_log``): the 20-byte header at offset 0; if it has
records, the records from offset 1024 in chunks of at most 4 KiB (Retain Asynchronous Event on all
but the last); the header again, and a retry if the generation counter moved meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio

from nvmeof.errors import NvmeofError, ProtocolError
from nvmeof.initiator.controller import (
    ADMIN_QUEUE_DEPTH,
    ConnectOptions,
    Controller,
    default_host_identity,
)
from nvmeof.spec.discovery import (
    DISCOVERY_LOG_ENTRY_SIZE,
    DISCOVERY_LOG_HEADER_PREFIX,
    DISCOVERY_LOG_HEADER_SIZE,
    DiscoveryEntry,
    DiscoveryLogHeader,
)
from nvmeof.spec.fabrics import DISCOVERY_NQN
from nvmeof.spec.features import LogPageId, get_log_page_command
from nvmeof.spec.identify import ControllerType
from nvmeof.transport.base import HostConnector
from nvmeof.transport.sockets import open_tcp

log = logging.getLogger("nvmeof.initiator.discovery")

DISCOVERY_PORT = 8009
LOG_CHUNK = 4096
MAX_RETRIES = 10

__all__ = [
    "DISCOVERY_PORT",
    "DiscoveryEntry",
    "discover",
    "discovery_controller",
    "parse_discovery_address",
    "read_discovery_log",
]


def parse_discovery_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, ``"host"`` (port 8009) or ``(host, port)``."""
    if isinstance(address, tuple):
        return address
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest.lstrip(":") or DISCOVERY_PORT)
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host:
        return address, DISCOVERY_PORT
    return host, int(port)


async def _read_log(ctrl: Controller, offset: int, length: int, *, rae: bool) -> bytes:
    buf = bytearray(length)
    await ctrl.admin.execute(
        get_log_page_command(LogPageId.DISCOVERY, length, offset=offset, rae=rae),
        into=[memoryview(buf)],
        timeout=ctrl.options.timeout,
    )
    return bytes(buf)


async def read_discovery_log(ctrl: Controller) -> tuple[DiscoveryLogHeader, list[DiscoveryEntry]]:
    """The discovery log of a connected discovery controller, read as libnvme reads it."""
    for _ in range(MAX_RETRIES):
        header = DiscoveryLogHeader.unpack(
            await _read_log(ctrl, 0, DISCOVERY_LOG_HEADER_PREFIX, rae=True)
        )
        records = bytearray()
        total = header.numrec * DISCOVERY_LOG_ENTRY_SIZE
        while len(records) < total:
            size = min(LOG_CHUNK, total - len(records))
            last = len(records) + size == total
            offset = DISCOVERY_LOG_HEADER_SIZE + len(records)
            records += await _read_log(ctrl, offset, size, rae=not last)
        again = DiscoveryLogHeader.unpack(
            await _read_log(ctrl, 0, DISCOVERY_LOG_HEADER_PREFIX, rae=False)
        )
        if again.genctr != header.genctr:
            log.debug("discovery log changed while reading (genctr %d -> %d)", header.genctr,
                      again.genctr)  # fmt: skip
            continue
        if again.numrec != header.numrec:
            raise ProtocolError(
                f"discovery log record count changed ({header.numrec} -> {again.numrec})"
                " without a new generation"
            )
        entries = [
            DiscoveryEntry.unpack(records, i * DISCOVERY_LOG_ENTRY_SIZE)
            for i in range(header.numrec)
        ]
        return header, entries
    raise NvmeofError(f"discovery log kept changing over {MAX_RETRIES} reads")


@contextlib.asynccontextmanager
async def discovery_controller(
    address: str | tuple[str, int],
    *,
    hostnqn: str | None = None,
    hostid: bytes | None = None,
    header_digest: bool = False,
    data_digest: bool = False,
    timeout: float = 10.0,
    connector: HostConnector = open_tcp,
) -> AsyncIterator[Controller]:
    """A connected, enabled discovery controller (admin queue only, KATO 0), shut down on exit."""
    host, port = parse_discovery_address(address)
    default_nqn, default_id = default_host_identity()
    options = ConnectOptions(
        host=host,
        port=port,
        subnqn=DISCOVERY_NQN,
        hostnqn=hostnqn or default_nqn,
        hostid=hostid or default_id,
        io_queues=0,
        queue_depth=ADMIN_QUEUE_DEPTH,
        kato_ms=0,
        header_digest=header_digest,
        data_digest=data_digest,
        timeout=timeout,
        connector=connector,
    )
    admin, cntlid = await Controller._connect_queue(options, qid=0, depth=ADMIN_QUEUE_DEPTH)
    ctrl = Controller(options, admin, cntlid)
    try:
        with anyio.fail_after(timeout):
            await ctrl._enable()
            await ctrl._identify()
        if ctrl.identify is not None and ctrl.identify.cntrltype not in (
            0,
            ControllerType.DISCOVERY,
        ):
            log.warning(
                "%s:%d: controller type %d is not a discovery controller",
                host, port, ctrl.identify.cntrltype,
            )  # fmt: skip
        yield ctrl
    except BaseException:
        with anyio.CancelScope(shield=True):
            await ctrl.close(shutdown=False)
        raise
    with anyio.CancelScope(shield=True):
        await ctrl.close()


async def discover(
    address: str | tuple[str, int],
    *,
    hostnqn: str | None = None,
    hostid: bytes | None = None,
    header_digest: bool = False,
    data_digest: bool = False,
    timeout: float = 10.0,
    connector: HostConnector = open_tcp,
) -> list[DiscoveryEntry]:
    """Connect to the discovery controller at ``address`` (port 8009 unless given), read the
    discovery log, disconnect; the entries say which subsystems this host may connect to where."""
    async with discovery_controller(
        address,
        hostnqn=hostnqn,
        hostid=hostid,
        header_digest=header_digest,
        data_digest=data_digest,
        timeout=timeout,
        connector=connector,
    ) as ctrl:
        with anyio.fail_after(timeout):
            _, entries = await read_discovery_log(ctrl)
    return entries
