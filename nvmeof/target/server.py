"""The target's listeners: accept NVMe/TCP connections and serve each as one queue."""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from nvmeof.target.queue import QueueSession
from nvmeof.target.subsystem import ListenAddress, Target
from nvmeof.tcp.events import ConnectionParams
from nvmeof.transport.base import ByteStream, ControllerChannel
from nvmeof.transport.sockets import TcpListener
from nvmeof.transport.tcp import TcpControllerChannel

log = logging.getLogger("nvmeof.target")


class TargetServer:
    """Serves a ``Target`` on one or more TCP listeners.

    Each connection is one queue and lives in its own task group: a connection that breaks, or
    sends garbage, ends alone; the others keep being served.
    """

    def __init__(self, target: Target, *, allow_digests: bool = True) -> None:
        self.target = target
        self.allow_digests = allow_digests
        self.listeners: list[TcpListener] = []
        self.connections = 0

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 4420,
        *,
        task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.serve_listener(self.listen(host, port), task_status=task_status)

    def listen(self, host: str = "127.0.0.1", port: int = 4420) -> TcpListener:
        """Bind now, so a busy port fails here and plainly; then ``serve_listener`` it."""
        return TcpListener(host, port)

    async def serve_listener(
        self,
        listener: TcpListener,
        *,
        discovery: bool = False,
        address: ListenAddress | None = None,
        task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """``discovery``: a dedicated discovery port (8009), not listed as an I/O port.
        ``address``: how subsystems name this listener (default: its bound host and port);
        each connection's session carries it, so a subsystem can refuse unlisted addresses."""
        self.listeners.append(listener)
        if address is None:
            address = ListenAddress(traddr=listener.host, trsvcid=str(listener.port))
        ports = self.target.discovery_addresses if discovery else self.target.listen_addresses
        ports.append(address)
        log.info("listening on %s:%d (NVMe/TCP)", listener.host, listener.port)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started((listener.host, listener.port))
                while True:
                    sock = await listener.accept()
                    tg.start_soon(self.handle_connection, sock, address)
        finally:
            self.listeners.remove(listener)
            ports.remove(address)
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def handle_connection(
        self,
        sock: ByteStream,
        address: ListenAddress | None = None,
        *,
        negotiated: ConnectionParams | None = None,
    ) -> None:
        """Serve one queue's connection (any byte stream: TCP, or the simulator's) that came in
        through the listener ``address``; ``negotiated``: its ICReq was already answered (a
        supervisor handed it over, ``nvmeof.target.workers``)."""
        limits = self.target.limits
        if self.connections >= limits.max_connections:
            log.warning(
                "connection from %s refused: %d connections (max_connections)",
                sock.peer, self.connections,
            )  # fmt: skip
            with anyio.CancelScope(shield=True):
                await sock.aclose()
            return
        channel = TcpControllerChannel(
            sock,
            maxh2cdata=limits.maxh2cdata,
            allow_digests=self.allow_digests,
            negotiated=negotiated,
            header_timeout=limits.header_timeout,
            in_capsule_budget=limits.max_in_flight_bytes,
        )
        await self.serve_channel(channel, address)

    async def serve_channel(
        self, channel: ControllerChannel, address: ListenAddress | None = None
    ) -> None:
        """Serve one queue over any transport's controller channel (TCP; RDMA through
        ``nvmeof.target.rdma_server``)."""
        self.connections += 1
        log.debug("connection from %s", channel.peer)
        try:
            async with anyio.create_task_group() as tg:
                session = QueueSession(self.target, channel, tg, listen_address=address)
                if isinstance(channel, TcpControllerChannel):
                    channel.on_digest_error = session.on_digest_error
                try:
                    await channel.run(session.on_request)
                finally:
                    session.teardown()
                    tg.cancel_scope.cancel()
        except Exception:
            # A bug in serving one connection must not take the listener down.
            log.exception("connection from %s failed", channel.peer)
        finally:
            self.connections -= 1
            with anyio.CancelScope(shield=True):
                await channel.aclose()
            log.debug("connection from %s closed", channel.peer)
