"""The transport interface: what the target and the initiator see of TCP, RDMA and the simulator.

A queue pair is a reliable, ordered channel of command and response capsules plus a way to move
data buffers (NVMe/TCP: R2T, H2CData and C2HData; RDMA: READ/WRITE against keyed SGLs). Buffers are
the caller's: a value lands directly in the tensor that asked for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import attrs

from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion

Buffer = bytes | bytearray | memoryview


class ByteStream(Protocol):
    """A reliable ordered byte stream with zero-copy receive: a TCP socket, or the simulator's.

    ``recv_into`` returns 0 at end of stream; failures raise ``ConnectionLost``; with a
    ``timeout``, no byte for that many seconds raises ``TimeoutError`` (and costs nothing while
    bytes are already there: no cancel scope per receive on a busy stream). ``at_least``: bytes
    the peer is sure to send (the rest of a payload); the stream may wait until that many are
    there (or some, if they stall past ``timeout``), so a large payload comes in few receives.
    """

    peer: str

    async def recv_into(
        self, view: memoryview, *, timeout: float = math.inf, at_least: int = 1
    ) -> int: ...

    async def send_all(self, buffers: Sequence[Buffer]) -> None: ...

    async def aclose(self) -> None: ...


class HostConnector(Protocol):
    """Opens the byte stream of one new queue (TCP by default; the simulator plugs in here)."""

    async def __call__(self, host: str, port: int) -> ByteStream: ...


@attrs.define(eq=False)
class Request:
    """One command as the target's core sees it, whatever the transport."""

    command: Command
    in_capsule: memoryview | None = None


class ControllerChannel(Protocol):
    """The controller side of one queue pair."""

    trtype: str
    peer: str

    async def run(self, on_request: Callable[[Request], None]) -> None:
        """Receive until the connection ends, handing each command to ``on_request``."""

    async def pull(self, request: Request, into: memoryview) -> None:
        """Move the command's host-to-controller data into ``into``."""

    async def complete(
        self, request: Request, completion: Completion, data: Sequence[Buffer] = ()
    ) -> None:
        """Send the command's controller-to-host ``data``, then its completion."""

    def set_max_in_capsule_data(self, size: int) -> None: ...

    async def aclose(self) -> None: ...


class HostChannel(Protocol):
    """The host side of one queue pair."""

    trtype: str
    peer: str
    max_in_capsule_data: int

    async def submit(
        self,
        command: Command,
        *,
        cid: int,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
    ) -> None:
        """Send ``command`` as ``cid``; ``out`` is its data to the controller, ``into`` where the
        controller's data lands. The transport fills in the data pointer."""

    async def next_completion(self) -> Completion:
        """The next completion on this queue (data for it has landed by then)."""

    def next_completion_nowait(self) -> Completion | None:
        """The next completion if it is already here, else None (then ``next_completion``)."""

    def forget(self, cid: int) -> None:
        """Drop the buffers of a command given up on (timeout)."""

    async def aclose(self) -> None: ...


@runtime_checkable
class SendDelegating(Protocol):
    """A host channel whose reader can hand the pushing of queued data (NVMe/TCP H2CData that
    R2Ts asked for) to another task, so that reading completions never waits on a long send."""

    delegate_send: Callable[[], bool] | None

    async def flush(self) -> None:
        """Push what is queued; the task that ``delegate_send`` woke calls this."""

    def undelegate(self) -> None:
        """The woken task will not push after all: the reader sees to it."""
