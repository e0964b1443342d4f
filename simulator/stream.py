"""Simulated byte streams: what ``nvmeof.transport.tcp`` runs on in the simulator.

``SimStream`` implements ``nvmeof.transport.base.ByteStream`` (``recv_into``, ``send_all``,
``aclose``), so ``TcpHostChannel.connect(..., connector=fabric_connector)`` and
``TargetServer.handle_connection(stream)`` run every line of the real NVMe/TCP code over it.

A send copies its buffers once into a wire segment (as a kernel copies into its socket buffer; the
caller may reuse its buffers as soon as ``send_all`` returns), stamps it with the time its last byte
arrives (``Direction.schedule``: queueing, serialisation, latency, loss) and appends it to the
connection's FIFO. ``recv_into`` waits in virtual time until the head segment has arrived, then
copies it straight into the caller's view. Delivery order is the FIFO's and arrival times come from
the seeded link model, never from which task the scheduler happens to run first.

Failures are ``ConnectionLost`` on both ends: a cut or partitioned link, a crashed node, or a reset
a route hook asked for after the first N bytes of a segment.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from nvmeof.errors import ConnectionLost
from nvmeof.transport.base import Buffer, ByteStream, HostConnector
from simulator.fabric import Direction, Fabric, Link, LinkState, Segment

log = logging.getLogger("simulator.stream")


class Signal:
    """A level-free wake-up: ``fire()`` wakes everyone waiting now."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, deadline: float = float("inf")) -> None:
        """Until the next ``fire()`` or virtual time ``deadline``, whichever comes first."""
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        with anyio.CancelScope(deadline=deadline):
            await event.wait()


@attrs.define
class _WireSegment:
    arrival: float
    data: memoryview
    read: int = 0


class _Pipe:
    """One direction of one connection: segments in flight and arrived, oldest first."""

    def __init__(self, direction: Direction) -> None:
        self.direction = direction
        self.segments: collections.deque[_WireSegment] = collections.deque()
        self.unread = 0
        self.sent = 0
        self.last_arrival = 0.0
        self.eof_at: float | None = None
        self.reset_at: float | None = None  # the reset follows the last segment queued
        self.changed = Signal()


class SimConnection:
    """Both directions of one simulated TCP connection over one link."""

    def __init__(self, fabric: Fabric, link: Link, client: str, server: str, port: int) -> None:
        self.id = fabric.next_connection_id()
        self.link = link
        self.client = client
        self.server = server
        self.port = port
        self.lost: str | None = None
        self.pipes = {
            client: _Pipe(link.direction(client, server)),
            server: _Pipe(link.direction(server, client)),
        }  # keyed by sender
        self.client_port = 40000 + self.id
        link.attach(self)

    def wake(self) -> None:
        for pipe in self.pipes.values():
            pipe.changed.fire()

    def lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            self.link.detach(self)
            log.debug("connection %d (%s -> %s) lost: %s", self.id, self.client, self.server,
                      reason)  # fmt: skip
        self.wake()

    def check(self, now: float) -> None:
        for pipe in self.pipes.values():
            if pipe.reset_at is not None and now >= pipe.reset_at:
                self.lose("connection reset by peer")
        if self.lost is not None:
            raise ConnectionLost(f"simulated connection {self.id}: {self.lost}")


class SimStream:
    """One end of a ``SimConnection``: a ``ByteStream``."""

    def __init__(self, connection: SimConnection, side: str) -> None:
        self.connection = connection
        self.side = side
        other = connection.server if side == connection.client else connection.client
        self.other = other
        self._out = connection.pipes[side]
        self._in = connection.pipes[other]
        if side == connection.client:
            self.peer = f"{other}:{connection.port}"
        else:
            self.peer = f"{other}:{connection.client_port}"
        self.closed = False

    async def recv_into(
        self, view: memoryview, *, timeout: float = math.inf, at_least: int = 1
    ) -> int:
        # at_least is only a hint, to save receives; a simulated segment costs no syscall.
        conn = self.connection
        pipe = self._in
        give_up = anyio.current_time() + timeout
        while True:
            now = anyio.current_time()
            if self.closed:
                raise ConnectionLost(f"simulated connection {conn.id} closed")
            conn.check(now)
            deadline = float("inf") if pipe.reset_at is None else pipe.reset_at
            if pipe.segments:
                head = pipe.segments[0]
                if head.arrival <= now and conn.link.state is LinkState.UP:
                    n = min(len(view), len(head.data) - head.read)
                    view[:n] = head.data[head.read : head.read + n]
                    head.read += n
                    if head.read == len(head.data):
                        pipe.segments.popleft()
                    pipe.unread -= n
                    pipe.changed.fire()  # a sender waiting on the window may go on
                    return n
                if conn.link.state is LinkState.UP:
                    deadline = min(deadline, head.arrival)
            elif pipe.eof_at is not None:
                if now >= pipe.eof_at:
                    return 0
                deadline = min(deadline, pipe.eof_at)
            if now >= give_up:
                raise TimeoutError(f"no data on simulated connection {conn.id} for {timeout}s")
            await pipe.changed.wait(min(deadline, give_up))

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        conn = self.connection
        pipe = self._out
        total = sum(memoryview(b).nbytes for b in buffers)
        while True:
            now = anyio.current_time()
            if self.closed:
                raise ConnectionLost(f"simulated connection {conn.id} closed")
            conn.check(now)
            if self._in.eof_at is not None or pipe.reset_at is not None:
                raise ConnectionLost(f"simulated connection {conn.id}: peer closed")
            if total == 0:
                await anyio.lowlevel.checkpoint()
                return
            if pipe.unread < conn.link.spec.window:
                break
            await pipe.changed.wait()
        wire = memoryview(bytearray().join(buffers))  # the one copy onto the "wire"
        verdict = conn.link.route_segment(
            Segment(self.side, self.other, conn.id, pipe.sent, wire, now)
        )
        if verdict is not None and verdict.reset_after is not None:
            wire = wire[: verdict.reset_after]
        arrival = pipe.direction.schedule(now, len(wire), verdict.delay if verdict else 0.0)
        arrival = max(arrival, pipe.last_arrival)  # a connection stays in order
        pipe.last_arrival = arrival
        if len(wire):
            pipe.segments.append(_WireSegment(arrival, wire))
            pipe.unread += len(wire)
            pipe.sent += len(wire)
        if verdict is not None and verdict.reset_after is not None:
            pipe.reset_at = arrival
        pipe.changed.fire()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            now = anyio.current_time()
            pipe = self._out
            pipe.eof_at = max(now + pipe.direction.link.spec.latency, pipe.last_arrival)
            pipe.changed.fire()
            self._in.changed.fire()
            if self._in.eof_at is not None:
                self.connection.link.detach(self.connection)
        await anyio.lowlevel.checkpoint()


class SimListener:
    """Accepts simulated connections to ``node:port``."""

    def __init__(self, network: SimNetwork, node: str, port: int) -> None:
        self.network = network
        self.node = node
        self.port = port
        self.closed = False
        self._pending: collections.deque[SimStream] = collections.deque()
        self._changed = Signal()

    def offer(self, stream: SimStream) -> None:
        self._pending.append(stream)
        self._changed.fire()

    async def accept(self) -> SimStream:
        while True:
            if self.closed:
                raise ConnectionLost(f"listener {self.node}:{self.port} closed")
            if self._pending:
                return self._pending.popleft()
            await self._changed.wait()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.network.listeners.pop((self.node, self.port), None)
            self._changed.fire()
        await anyio.lowlevel.checkpoint()


class SimNetwork:
    """Simulated TCP over a ``Fabric``: listeners, and connectors that plug into the initiator."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.listeners: dict[tuple[str, int], SimListener] = {}

    def listen(self, node: str, port: int) -> SimListener:
        if (node, port) in self.listeners:
            raise OSError(f"{node}:{port} already has a listener")
        listener = SimListener(self, node, port)
        self.listeners[(node, port)] = listener
        self.fabric.node(node).watch(lambda: self._node_changed(listener))
        return listener

    def _node_changed(self, listener: SimListener) -> None:
        if not self.fabric.node(listener.node).up and not listener.closed:
            listener.closed = True
            self.listeners.pop((listener.node, listener.port), None)
            listener._changed.fire()

    def connector(self, node: str) -> HostConnector:
        """A ``HostConnector`` for the initiator on ``node``: ``connector=net.connector("h0")``."""

        async def connect(host: str, port: int) -> ByteStream:
            return await self.connect(node, host, port)

        return connect

    async def connect(self, node: str, host: str, port: int) -> SimStream:
        fabric = self.fabric
        if host not in fabric.nodes:
            raise ConnectionLost(f"cannot connect to {host}:{port}: no such node")
        link = fabric.link(node, host)
        # SYN and SYN-ACK: one round trip of latency before the connection is usable.
        await anyio.sleep(2 * link.spec.latency)
        listener = self.listeners.get((host, port))
        if not fabric.reachable(node, host):
            raise ConnectionLost(f"cannot connect to {host}:{port}: unreachable")
        if listener is None or listener.closed:
            raise ConnectionLost(f"cannot connect to {host}:{port}: connection refused")
        connection = SimConnection(fabric, link, node, host, port)
        listener.offer(SimStream(connection, host))
        return SimStream(connection, node)


async def serve_streams(
    network: SimNetwork,
    node: str,
    port: int,
    handler: Callable[[SimStream], Coroutine[Any, Any, None]],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``node:port`` and run ``handler`` per connection, until the node crashes."""
    listener = network.listen(node, port)
    task_status.started()
    try:
        async with anyio.create_task_group() as tg:
            with contextlib.suppress(ConnectionLost):
                while True:
                    tg.start_soon(handler, await listener.accept())
            tg.cancel_scope.cancel()  # the node crashed: its connections die with it
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()
