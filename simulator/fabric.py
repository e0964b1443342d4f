"""The simulated network: nodes, links with latency, bandwidth and queueing, and faults on demand.

A ``Link`` joins two nodes; each direction is one FIFO serialiser: a transfer of ``n`` bytes
starts when the direction is free, holds it for ``n / bandwidth`` seconds and arrives ``latency``
seconds after it has left (plus, on a seeded draw, a retransmission timeout for a lost segment, and
whatever a route hook adds). Every connection between the two nodes shares those serialisers, so
concurrent transfers queue behind each other; a node may also have a NIC bandwidth (``Node.nic``)
that all its links share: a transfer passes the link, the sender's transmit side and the
receiver's receive side, each a FIFO at its own bandwidth, and is through when the slowest is.

Faults: ``Link.cut()`` breaks every connection on the link (both ends get ``ConnectionLost``) and
refuses new ones until ``restore()``; ``stall()`` stops delivery (bytes queue up, senders block on
the window) until ``resume()``; a route hook can delay a segment or reset the connection after the
first N bytes of it; ``Fabric.partition`` cuts every link between groups of nodes; ``Node.crash``
cuts all of a node's connections and closes its listeners until ``restart``.

Everything random comes from generators seeded from the fabric's seed and the link's name, so a
run depends on the seed alone. Nothing here awaits: the byte streams (``simulator.stream``) and the
verbs layer (``simulator.verbs``) ask the link when bytes arrive and wait in (virtual) time
themselves.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from typing import Protocol

import attrs


@attrs.frozen
class LinkSpec:
    """One link's physics. Defaults: a 100 Gb/s datacenter link with 5 µs one-way latency."""

    latency: float = 5e-6  # one way, seconds
    bandwidth: float = 100e9 / 8  # bytes per second, each direction
    window: int = 4 << 20  # bytes a connection may have unread in flight (TCP's window)
    loss: float = 0.0  # probability that a segment is lost once and retransmitted
    rto: float = 0.2  # retransmission timeout a lost segment costs (Linux's minimum RTO)
    jitter: float = 0.0  # up to this much extra one-way delay, uniformly drawn

    def transfer_time(self, size: int) -> float:
        return size / self.bandwidth


@attrs.frozen
class Segment:
    """What a route hook sees: one send on one connection."""

    src: str
    dst: str
    connection: int
    offset: int  # bytes this connection sent in this direction before this segment
    data: memoryview
    time: float


@attrs.frozen
class Verdict:
    """A route hook's answer: extra delay, and/or reset the connection after ``reset_after`` bytes
    of this segment have been delivered."""

    delay: float = 0.0
    reset_after: int | None = None


RouteHook = Callable[[Segment, random.Random], "Verdict | None"]


class LinkState(enum.Enum):
    UP = "up"
    STALLED = "stalled"
    CUT = "cut"


class Breakable(Protocol):
    """A connection the fabric can break (a byte stream pair, a queue pair)."""

    def lose(self, reason: str) -> None: ...

    def wake(self) -> None: ...


class Direction:
    """One direction of a link: a FIFO serialiser."""

    def __init__(self, link: Link, src: str, dst: str) -> None:
        self.link = link
        self.src = src
        self.dst = dst
        self.free_at = 0.0
        self.bytes_sent = 0

    def schedule(self, now: float, size: int, extra_delay: float = 0.0) -> float:
        """Reserve the wire for ``size`` bytes sent at ``now``; the time they arrive."""
        spec = self.link.spec
        src, dst = self.link.fabric.nodes[self.src], self.link.fabric.nodes[self.dst]
        # The link, the sender's NIC (transmit side) and the receiver's NIC (receive side) are
        # three FIFOs the bytes pass at once (cut-through); the slowest decides when they are
        # through.
        self.free_at = max(now, self.free_at) + size / spec.bandwidth
        end = self.free_at
        if src.nic != float("inf"):
            src.tx_free_at = max(now, src.tx_free_at) + size / src.nic
            end = max(end, src.tx_free_at)
        if dst.nic != float("inf"):
            dst.rx_free_at = max(now, dst.rx_free_at) + size / dst.nic
            end = max(end, dst.rx_free_at)
        self.bytes_sent += size
        delay = spec.latency + extra_delay
        rng = self.link.rng
        if spec.loss and rng.random() < spec.loss:
            delay += spec.rto
        if spec.jitter:
            delay += rng.uniform(0.0, spec.jitter)
        return end + delay


class Link:
    """A full-duplex link between two nodes."""

    def __init__(self, fabric: Fabric, a: str, b: str, spec: LinkSpec) -> None:
        self.fabric = fabric
        self.a, self.b = a, b
        self.spec = spec
        self.rng = random.Random(f"{fabric.seed}:link:{a}:{b}")
        self.state = LinkState.UP
        self.route: RouteHook | None = None
        self._directions = {(a, b): Direction(self, a, b), (b, a): Direction(self, b, a)}
        self._connections: list[Breakable] = []
        self._watchers: list[Callable[[], None]] = []

    @property
    def name(self) -> str:
        return f"{self.a}<->{self.b}"

    def direction(self, src: str, dst: str) -> Direction:
        return self._directions[(src, dst)]

    def attach(self, connection: Breakable) -> None:
        self._connections.append(connection)

    def detach(self, connection: Breakable) -> None:
        if connection in self._connections:
            self._connections.remove(connection)

    def watch(self, callback: Callable[[], None]) -> None:
        """``callback()`` whenever the link's state changes (stall, resume, cut)."""
        self._watchers.append(callback)

    def _changed(self) -> None:
        for connection in list(self._connections):
            connection.wake()
        for callback in list(self._watchers):
            callback()

    def route_segment(self, segment: Segment) -> Verdict | None:
        return self.route(segment, self.rng) if self.route is not None else None

    # --- faults -------------------------------------------------------------------------------
    def cut(self, reason: str = "link cut") -> None:
        """Break every connection on the link; refuse new ones until ``restore()``."""
        self.state = LinkState.CUT
        self.break_connections(f"{reason} ({self.name})")
        self._changed()

    def break_connections(self, reason: str) -> None:
        for connection in list(self._connections):
            connection.lose(reason)
        self._connections.clear()

    def restore(self) -> None:
        self.state = LinkState.UP
        self._changed()

    def stall(self) -> None:
        """Stop delivering bytes (both directions) until ``resume()``; nothing is lost."""
        if self.state is LinkState.UP:
            self.state = LinkState.STALLED
            self._changed()

    def resume(self) -> None:
        if self.state is LinkState.STALLED:
            self.state = LinkState.UP
            self._changed()


class Node:
    """A machine on the fabric: it can crash and restart."""

    def __init__(self, fabric: Fabric, name: str) -> None:
        self.fabric = fabric
        self.name = name
        self.up = True
        self.generation = 0  # restarts so far
        self.nic = float("inf")  # bytes/s each way, shared by all of the node's links
        self.tx_free_at = 0.0
        self.rx_free_at = 0.0
        self._watchers: list[Callable[[], None]] = []

    def watch(self, callback: Callable[[], None]) -> None:
        self._watchers.append(callback)

    def crash(self) -> None:
        """Break every connection to or from this node; its services stop until ``restart``."""
        self.up = False
        for link in self.fabric.links_of(self.name):
            link.break_connections(f"node {self.name} crashed")
        for callback in list(self._watchers):
            callback()

    def restart(self) -> None:
        self.up = True
        self.generation += 1
        for callback in list(self._watchers):
            callback()


class Fabric:
    """Nodes and the links between them; every link is created on first use with ``default``."""

    def __init__(self, seed: int = 0, default: LinkSpec | None = None) -> None:
        self.seed = seed
        self.default = default or LinkSpec()
        self.nodes: dict[str, Node] = {}
        self._links: dict[tuple[str, str], Link] = {}
        self._specs: dict[tuple[str, str], LinkSpec] = {}
        self._connection_ids = 0

    def node(self, name: str) -> Node:
        if name not in self.nodes:
            self.nodes[name] = Node(self, name)
        return self.nodes[name]

    def set_link(self, a: str, b: str, spec: LinkSpec) -> Link:
        """Give the link between ``a`` and ``b`` its own physics (before or after first use)."""
        key = _pair(a, b)
        self._specs[key] = spec
        link = self.link(a, b)
        link.spec = spec
        return link

    def link(self, a: str, b: str) -> Link:
        key = _pair(a, b)
        if key not in self._links:
            self.node(a)
            self.node(b)
            self._links[key] = Link(self, key[0], key[1], self._specs.get(key, self.default))
        return self._links[key]

    def links_of(self, name: str) -> list[Link]:
        return [link for key, link in self._links.items() if name in key]

    def next_connection_id(self) -> int:
        self._connection_ids += 1
        return self._connection_ids

    def reachable(self, a: str, b: str) -> bool:
        return self.node(a).up and self.node(b).up and self.link(a, b).state is not LinkState.CUT

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between nodes of different groups."""
        sets = [set(g) for g in groups]
        for i, left in enumerate(sets):
            for right in sets[i + 1 :]:
                for a in sorted(left):
                    for b in sorted(right):
                        self.link(a, b).cut("network partition")

    def heal(self) -> None:
        """Restore every cut link."""
        for link in self._links.values():
            if link.state is LinkState.CUT:
                link.restore()


def _pair(a: str, b: str) -> tuple[str, str]:
    if a == b:
        raise ValueError(f"a link needs two different nodes, got {a!r} twice")
    return (a, b) if a < b else (b, a)
