"""The host side of one NVMe-oF controller: admin queue bring-up, I/O queues, shutdown."""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import attrs

from nvmeof.errors import AuthenticationFailed, ConnectionLost, NvmeError, NvmeofError
from nvmeof.initiator.auth import DhchapOptions, authenticate
from nvmeof.initiator.queue import QueuePair
from nvmeof.spec.admin import keep_alive_command
from nvmeof.spec.auth import DhGroupId, HashId
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.dhchap import DhchapSecret, as_secret
from nvmeof.spec.fabrics import (
    CATTR_SQ_FLOW_CONTROL_DISABLED,
    CONNECT_AUTHREQ_ASCR,
    CONNECT_AUTHREQ_ATR,
    DYNAMIC_CNTLID,
    ConnectData,
    connect_command,
    property_get_command,
    property_set_command,
)
from nvmeof.spec.features import (
    FeatureId,
    decode_number_of_queues,
    encode_number_of_queues,
    set_features_command,
)
from nvmeof.spec.identify import (
    Cns,
    IdentifyController,
    NamespaceIdType,
    identify_command,
    unpack_namespace_id_descriptors,
    unpack_namespace_list,
)
from nvmeof.spec.properties import (
    CommandSetSelection,
    ControllerCapabilities,
    ControllerConfiguration,
    ControllerStatus,
    PropertyOffset,
    ShutdownNotification,
    ShutdownStatus,
)
from nvmeof.transport.base import Buffer, HostChannel, HostConnector
from nvmeof.transport.rdma import RdmaHostChannel
from nvmeof.transport.sockets import open_tcp
from nvmeof.transport.tcp import DEFAULT_PORT, TcpHostChannel
from nvmeof.transport.verbs import RdmaConnector

log = logging.getLogger("nvmeof.initiator")
#: Bytes from which a command's data counts as a large transfer (``Controller.queue``).
LARGE_TRANSFER = 64 * 1024

ADMIN_QUEUE_DEPTH = 32
DEFAULT_KATO_MS = 30_000


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, ``"host"`` or ``(host, port)``."""
    if isinstance(address, tuple):
        return address
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest.lstrip(":") or DEFAULT_PORT)
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host:
        return address, DEFAULT_PORT
    return host, int(port)


def default_host_identity() -> tuple[str, bytes]:
    """The host NQN and host ID, from /etc/nvme like nvme-cli, else derived from the machine id."""
    try:
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        hostid = uuid.UUID(Path("/etc/nvme/hostid").read_text().strip())
        return hostnqn, hostid.bytes
    except (OSError, ValueError):
        pass
    try:
        seed = Path("/etc/machine-id").read_text().strip()
    except OSError:
        seed = str(uuid.getnode())
    hostid = uuid.uuid5(uuid.NAMESPACE_URL, f"gpucache-host:{seed}")
    return f"nqn.2014-08.org.nvmexpress:uuid:{hostid}", hostid.bytes


@attrs.frozen
class NamespaceInfo:
    nsid: int
    csi: int


@attrs.frozen
class ConnectOptions:
    host: str
    port: int
    subnqn: str
    hostnqn: str
    hostid: bytes
    io_queues: int
    queue_depth: int
    kato_ms: int
    header_digest: bool
    data_digest: bool
    timeout: float
    connector: HostConnector = open_tcp
    dhchap: DhchapOptions | None = None  # in-band authentication (DH-HMAC-CHAP) secrets
    transport: str = "tcp"  # or "rdma" (NVMe/RDMA: the ``rdma`` extra, pyverbs)
    rdma_connector: RdmaConnector | None = None  # default: pyverbs (the simulator passes its own)
    rdma_invalidate: bool = False  # ask the controller for Send with Invalidate (SGL 0x4F)
    sq_flow_control: bool = True  # False: CATTR bit 2 on I/O queues (SUCCESS-flag completions)


class Controller:
    """A connected, enabled controller with its admin queue and I/O queues."""

    def __init__(self, options: ConnectOptions, admin: QueuePair, cntlid: int) -> None:
        self.options = options
        self.admin = admin
        self.cntlid = cntlid
        self.io_queues: list[QueuePair] = []
        self.identify: IdentifyController | None = None
        self.capabilities = ControllerCapabilities()
        self.namespaces: dict[int, NamespaceInfo] = {}
        self._next_queue = itertools.cycle([0])
        self._closed = False

    @staticmethod
    def connect(
        address: str | tuple[str, int],
        subnqn: str,
        *,
        hostnqn: str | None = None,
        hostid: bytes | None = None,
        io_queues: int = 1,
        queue_depth: int = 32,
        kato_ms: int | None = None,
        header_digest: bool = False,
        data_digest: bool = False,
        timeout: float = 10.0,
        connector: HostConnector = open_tcp,
        dhchap_secret: str | DhchapSecret | None = None,
        dhchap_ctrl_secret: str | DhchapSecret | None = None,
        dhchap_hashes: Sequence[HashId] | None = None,
        dhchap_dhgroups: Sequence[DhGroupId] | None = None,
        transport: str = "tcp",
        rdma_connector: RdmaConnector | None = None,
        rdma_invalidate: bool = False,
        sq_flow_control: bool = True,
    ) -> ControllerConnection:
        """Connect, enable and set up I/O queues.

        ``await Controller.connect(...)`` gives a controller with no keep-alive traffic (KATO 0
        unless ``kato_ms`` is given, then call ``keep_alive()`` yourself); ``async with
        Controller.connect(...) as ctrl`` also runs a keep-alive task (KATO 30 s by default) and
        shuts the controller down on exit. ``connector`` opens each queue's byte stream (TCP by
        default; the simulator passes its own). ``dhchap_secret`` (``DHHC-1:hh:...:``) answers a
        controller that requires DH-HMAC-CHAP; with ``dhchap_ctrl_secret`` the controller must
        prove itself too (bidirectional); ``dhchap_hashes`` / ``dhchap_dhgroups`` limit what is
        offered (default: all). ``transport="rdma"`` connects over NVMe/RDMA (pyverbs, or
        ``rdma_connector``); ``rdma_invalidate`` asks for Send with Invalidate.
        ``sq_flow_control=False`` disables SQ flow control on the I/O queues (Connect CATTR
        bit 2, Linux's ``disable_sqflow``), which lets an NVMe/TCP controller fold a read's
        completion into its last C2HData PDU (the SUCCESS flag).
        """
        if transport not in ("tcp", "rdma"):
            raise ValueError(f"transport must be 'tcp' or 'rdma', not {transport!r}")
        host, port = parse_address(address)
        default_nqn, default_id = default_host_identity()
        if io_queues < 1 or queue_depth < 1:
            raise ValueError("io_queues and queue_depth must be at least 1")
        options = ConnectOptions(
            host=host,
            port=port,
            subnqn=subnqn,
            hostnqn=hostnqn or default_nqn,
            hostid=hostid or default_id,
            io_queues=io_queues,
            queue_depth=queue_depth,
            kato_ms=-1 if kato_ms is None else kato_ms,
            header_digest=header_digest,
            data_digest=data_digest,
            timeout=timeout,
            connector=connector,
            dhchap=_dhchap_options(
                dhchap_secret, dhchap_ctrl_secret, dhchap_hashes, dhchap_dhgroups
            ),
            transport=transport,
            rdma_connector=rdma_connector,
            rdma_invalidate=rdma_invalidate,
            sq_flow_control=sq_flow_control,
        )
        return ControllerConnection(options)

    # --- bring-up ---------------------------------------------------------------------------
    @classmethod
    async def _open(cls, options: ConnectOptions) -> Controller:
        admin, cntlid = await cls._connect_queue(options, qid=0, depth=ADMIN_QUEUE_DEPTH)
        ctrl = cls(options, admin, cntlid)
        try:
            with anyio.fail_after(options.timeout):
                await ctrl._enable()
                await ctrl._identify()
                await ctrl._create_io_queues()
                await ctrl._scan_namespaces()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await ctrl.close(shutdown=False)
            raise
        log.info(
            "[%d] connected to %s at %s:%d: %d I/O queues x %d, namespaces %s",
            cntlid,
            options.subnqn,
            options.host,
            options.port,
            len(ctrl.io_queues),
            options.queue_depth,
            sorted(ctrl.namespaces),
        )
        return ctrl

    @staticmethod
    async def _connect_queue(
        options: ConnectOptions, *, qid: int, depth: int, cntlid: int = DYNAMIC_CNTLID
    ) -> tuple[QueuePair, int]:
        channel: HostChannel
        with anyio.fail_after(options.timeout):
            if options.transport == "rdma":
                channel = await _connect_rdma(options, qid=qid, depth=depth, cntlid=cntlid)
            else:
                channel = await TcpHostChannel.connect(
                    options.host,
                    options.port,
                    header_digest=options.header_digest,
                    data_digest=options.data_digest,
                    connector=options.connector,
                )
        queue = QueuePair(channel, qid=qid, depth=depth)
        data = ConnectData(
            hostid=options.hostid, cntlid=cntlid, subnqn=options.subnqn, hostnqn=options.hostnqn
        )
        kato = max(options.kato_ms, 0) if qid == 0 else 0
        try:
            completion = await queue.execute(
                connect_command(
                    qid=qid,
                    # 0's based and 0 is invalid: one command in flight takes a 2-entry queue.
                    sqsize=max(depth, 2) - 1,
                    kato_ms=kato,
                    cattr=0
                    if qid == 0 or options.sq_flow_control
                    else CATTR_SQ_FLOW_CONTROL_DISABLED,
                ),
                out=[data.pack()],
                timeout=options.timeout,
                check=False,
            )
            if not completion.status.success:
                raise NvmeError(
                    completion.status,
                    f"connect to {options.subnqn} at {options.host}:{options.port} (qid {qid})"
                    f" refused (dw0 0x{completion.dw0:x})",
                )
            queue.cntlid = completion.dw0 & 0xFFFF
            await _authenticate_queue(queue, options, completion.dw0)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await queue.aclose()
            raise
        return queue, queue.cntlid

    async def _enable(self) -> None:
        cap = await self.get_property(PropertyOffset.CAP, size=8)
        self.capabilities = ControllerCapabilities.from_int(cap)
        css = (
            CommandSetSelection.ALL_IO
            if self.capabilities.io_command_sets_supported
            else CommandSetSelection.NVM
        )
        cc = ControllerConfiguration(en=False, css=css, iosqes=6, iocqes=4)
        await self.set_property(PropertyOffset.CC, cc.to_int())
        await self.set_property(PropertyOffset.CC, attrs.evolve(cc, en=True).to_int())
        ready_timeout = max((self.capabilities.to + 1) / 2, 1.0)
        with anyio.fail_after(ready_timeout):
            while True:
                csts = ControllerStatus.from_int(await self.get_property(PropertyOffset.CSTS))
                if csts.cfs:
                    raise NvmeofError(f"controller {self.cntlid} reports fatal status on enable")
                if csts.rdy:
                    return
                await anyio.sleep(0.01)

    async def _identify(self) -> None:
        buf = bytearray(4096)
        await self.admin.execute(identify_command(Cns.CONTROLLER), into=[memoryview(buf)])
        self.identify = IdentifyController.unpack(buf)

    async def _create_io_queues(self) -> None:
        options = self.options
        wanted = options.io_queues - 1
        completion = await self.admin.execute(
            set_features_command(
                FeatureId.NUMBER_OF_QUEUES, encode_number_of_queues(wanted, wanted)
            )
        )
        nsqa, ncqa = decode_number_of_queues(completion.dw0)
        count = min(options.io_queues, nsqa + 1, ncqa + 1)
        depth = min(options.queue_depth, self.capabilities.mqes + 1)
        if self.identify is not None and self.identify.maxcmd:
            depth = min(depth, self.identify.maxcmd)
        for qid in range(1, count + 1):
            queue, _ = await self._connect_queue(options, qid=qid, depth=depth, cntlid=self.cntlid)
            if self.identify is not None:
                queue.channel.max_in_capsule_data = max(0, self.identify.ioccsz * 16 - 64)
            self.io_queues.append(queue)
        self._next_queue = itertools.cycle(range(len(self.io_queues)))

    async def _scan_namespaces(self) -> None:
        buf = bytearray(4096)
        await self.admin.execute(
            identify_command(Cns.ACTIVE_NAMESPACES, nsid=0), into=[memoryview(buf)]
        )
        for nsid in unpack_namespace_list(buf):
            desc = bytearray(4096)
            await self.admin.execute(
                identify_command(Cns.NAMESPACE_ID_DESCRIPTORS, nsid=nsid), into=[memoryview(desc)]
            )
            csi = 0
            for d in unpack_namespace_id_descriptors(desc):
                if d.nidt == NamespaceIdType.CSI and d.value:
                    csi = d.value[0]
            self.namespaces[nsid] = NamespaceInfo(nsid=nsid, csi=csi)

    # --- commands ---------------------------------------------------------------------------
    async def get_property(self, offset: int, *, size: int = 4) -> int:
        completion = await self.admin.execute(property_get_command(offset, size=size))
        return completion.result

    async def set_property(self, offset: int, value: int, *, size: int = 4) -> None:
        await self.admin.execute(property_set_command(offset, value, size=size))

    async def keep_alive(self) -> None:
        await self.admin.execute(keep_alive_command(), timeout=self.options.timeout)

    async def run_keep_alive(self, interval: float | None = None) -> None:
        """Send Keep Alive every KATO/2 (or ``interval`` seconds) until cancelled."""
        kato = self.options.kato_ms
        period = interval if interval is not None else max(kato, 1000) / 2000
        while not self._closed:
            await anyio.sleep(period)
            try:
                await self.keep_alive()
            except NvmeofError as exc:
                log.warning("[%d] keep alive failed, stopping: %s", self.cntlid, exc)
                return

    def queue(self, nbytes: int = 0) -> QueuePair:
        """The I/O queue for a command that moves ``nbytes``.

        Small commands go to the first queue with a free slot: one ``sendmsg`` and one ``recv``
        then carry many of them, where spreading them would split every batch (on a
        GPUCache target, whose process serves all its queues from one thread, that is all it
        does). Large transfers take the queues round robin, so their streams move side by side.
        """
        queues = self.io_queues
        if not queues:
            raise ConnectionLost("controller has no I/O queues")
        if nbytes < LARGE_TRANSFER:
            for queue in queues:
                if queue.in_flight < queue.depth:
                    return queue
        return queues[next(self._next_queue)]

    async def execute_io(
        self,
        command: Command,
        *,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
        timeout: float | None = None,
        check: bool = True,
        queue: QueuePair | None = None,
    ) -> Completion:
        if queue is None:
            queue = self.queue(sum(map(len, out)) + sum(map(len, into)))
        return await queue.execute(command, out=out, into=into, timeout=timeout, check=check)

    # --- teardown ---------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Normal shutdown (CC.SHN = 01b), waiting for CSTS.SHST = complete."""
        cc = ControllerConfiguration.from_int(await self.get_property(PropertyOffset.CC))
        await self.set_property(
            PropertyOffset.CC, attrs.evolve(cc, shn=ShutdownNotification.NORMAL).to_int()
        )
        with anyio.fail_after(self.options.timeout):
            while True:
                csts = ControllerStatus.from_int(await self.get_property(PropertyOffset.CSTS))
                if csts.shst == ShutdownStatus.COMPLETE:
                    return
                await anyio.sleep(0.01)

    async def close(self, *, shutdown: bool = True) -> None:
        if self._closed:
            return
        if shutdown and self.admin.connected:
            try:
                await self.shutdown()
            except (NvmeofError, TimeoutError) as exc:
                log.warning("[%d] shutdown failed: %s", self.cntlid, exc)
        self._closed = True
        for queue in self.io_queues:
            await queue.aclose()
        await self.admin.aclose()
        log.info("[%d] disconnected", self.cntlid)


def _dhchap_options(
    secret: str | DhchapSecret | None,
    ctrl_secret: str | DhchapSecret | None,
    hashes: Sequence[HashId] | None,
    dhgroups: Sequence[DhGroupId] | None,
) -> DhchapOptions | None:
    if secret is None:
        if ctrl_secret is not None:
            raise ValueError("dhchap_ctrl_secret needs dhchap_secret")
        return None
    options = DhchapOptions(
        secret=as_secret(secret),
        ctrl_secret=None if ctrl_secret is None else as_secret(ctrl_secret),
    )
    if hashes is not None:
        options = attrs.evolve(options, hashes=tuple(HashId(h) for h in hashes))
    if dhgroups is not None:
        options = attrs.evolve(options, dhgroups=tuple(DhGroupId(g) for g in dhgroups))
    return options


async def _authenticate_queue(queue: QueuePair, options: ConnectOptions, dw0: int) -> None:
    """After Connect: run DH-HMAC-CHAP if the controller asks (AUTHREQ.ATR), as Linux does."""
    where = f"{options.subnqn} at {options.host}:{options.port} (qid {queue.qid})"
    if dw0 & CONNECT_AUTHREQ_ASCR:
        raise AuthenticationFailed(f"{where} requires a secure channel (not supported)")
    if not dw0 & CONNECT_AUTHREQ_ATR:
        if queue.qid == 0 and options.dhchap is not None and options.dhchap.ctrl_secret:
            # The host wants the controller to prove itself; one that never asks cannot.
            raise AuthenticationFailed(f"{where} did not ask to authenticate; cannot verify it")
        return
    if options.dhchap is None:
        raise AuthenticationFailed(f"{where} requires authentication: no DH-HMAC-CHAP secret")
    await authenticate(
        queue,
        options.dhchap,
        hostnqn=options.hostnqn,
        subnqn=options.subnqn,
        timeout=options.timeout,
    )
    log.debug("[%d/%d] authenticated to %s", queue.cntlid, queue.qid, options.subnqn)


class ControllerConnection:
    """What ``Controller.connect`` returns: await it, or use it as an async context manager."""

    def __init__(self, options: ConnectOptions) -> None:
        self._options = options
        self._controller: Controller | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    def __await__(self) -> Generator[Any, None, Controller]:
        options = self._options
        if options.kato_ms < 0:
            options = attrs.evolve(options, kato_ms=0)
        return Controller._open(options).__await__()

    async def __aenter__(self) -> Controller:
        options = self._options
        if options.kato_ms < 0:
            options = attrs.evolve(options, kato_ms=DEFAULT_KATO_MS)
        ctrl = await Controller._open(options)
        self._controller = ctrl
        if options.kato_ms:
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            self._task_group.start_soon(ctrl.run_keep_alive)
        return ctrl

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._controller is not None
        try:
            if self._task_group is not None:
                self._task_group.cancel_scope.cancel()
                await self._task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._controller.close()
        return None


async def _connect_rdma(
    options: ConnectOptions, *, qid: int, depth: int, cntlid: int
) -> RdmaHostChannel:
    connector = options.rdma_connector
    if connector is None:
        from nvmeof.transport.pyverbs_backend import PyverbsConnector  # needs the rdma extra

        connector = PyverbsConnector()
    return await RdmaHostChannel.connect(
        options.host,
        options.port,
        connector=connector,
        qid=qid,
        depth=depth,
        cntlid=0 if cntlid == DYNAMIC_CNTLID else cntlid,
        invalidate=options.rdma_invalidate,
    )
