"""Non-blocking sockets driven by anyio readiness waits.

anyio's socket streams copy every received chunk into new ``bytes`` and have no ``receive_into``;
the data path needs ``recv_into`` straight into the destination buffer and one ``sendmsg`` for a
header and its payload views. So transports own plain non-blocking sockets and wait for readiness
with ``anyio.wait_readable``/``wait_writable``, which works on asyncio and trio alike. OS and anyio
errors become ``ConnectionLost`` here, in one place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import socket
import struct
import termios
import time
from collections.abc import Sequence

import anyio
import anyio.lowlevel

from nvmeof.errors import ConnectionLost

Buffer = bytes | bytearray | memoryview
_INT = struct.Struct("i")

# Linux caps one sendmsg at IOV_MAX (1024) buffers.
_IOV_MAX = 1024
#: Seconds a peer may accept no bytes at all while we have some to send, before the connection
#: counts as lost (as the Linux host's 30 s I/O timeout). Commands themselves time out on their
#: own; this bounds a send nobody drains, which no command timeout covers.
SEND_STALL_TIMEOUT = 30.0
# A socket's receive buffer is large (a megabyte payload fits with room to spare), its send buffer
# small. On loopback a sender whose data waits in a large send buffer for window has the rest
# pushed out by the ACKs that free it, from the receiver's CPU, while it sends from its own: the
# segments then arrive out of order and TCP retransmits them (1-2% of segments, and stalls of
# 200 ms here). With the send buffer well inside the window, the sender's own sendmsg sends
# everything: 4 MiB puts at 8 in flight went from ~700 to ~1000 ops/s, retransmits down 7x.
_RECEIVE_BUFFER = 4 * 1024 * 1024
_SEND_BUFFER = 1024 * 1024
_FAIR_RECEIVES = 32
# The most a receive waits to have before it reads (SO_RCVLOWAT): a quarter of the receive window
# that _RECEIVE_BUFFER gives, so the sender always has room to get there.
_WAIT_FOR = 1024 * 1024
#: Seconds a receive that finds nothing goes on trying before it sleeps on readiness (0: never),
#: for sockets made without their own ``poll``. A peer that answers within it is read without a
#: sleep and a wake-up, which on these VMs costs more than the answer itself (4 KiB gets at 1 in
#: flight: 276 us per round trip with both ends sleeping, 118 us with both polling). Between
#: tries the task yields to the other tasks of its loop and the process to any other process
#: waiting for the CPU; what a poll costs is CPU, at most this long per wait, which processes
#: sharing their cores with busy neighbours may not want (``gpucache target --poll-us 0``, or
#: GPUCACHE_POLL_US=0 for any process). The default is read from GPUCACHE_POLL_US at import.
DEFAULT_POLL_US = 200


def _poll_from_environment() -> float:
    raw = os.environ.get("GPUCACHE_POLL_US", str(DEFAULT_POLL_US))
    try:
        us = float(raw)
    except ValueError:
        raise ValueError(f"GPUCACHE_POLL_US={raw!r} is not a number of microseconds") from None
    return max(0.0, us) / 1e6


POLL = _poll_from_environment()


def set_default_poll(seconds: float) -> None:
    """``POLL`` for the sockets this process makes from now on (the target's ``--poll-us``)."""
    global POLL
    if seconds < 0:
        raise ValueError(f"poll {seconds} s is negative")
    POLL = seconds


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt, size in ((socket.SO_SNDBUF, _SEND_BUFFER), (socket.SO_RCVBUF, _RECEIVE_BUFFER)):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)


class AsyncSocket:
    """A connected non-blocking socket with zero-copy receive and scatter-gather send."""

    def __init__(self, sock: socket.socket, *, poll: float | None = None) -> None:
        tune(sock)
        self.sock = sock
        self.poll = POLL if poll is None else poll  # seconds; see POLL
        self.closed = False
        self.send_stall_timeout = SEND_STALL_TIMEOUT
        self._streak = 0  # receives in a row that did not wait
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._low_water = 1  # SO_RCVLOWAT as last set
        try:
            self.peer = _format_address(sock.getpeername())
        except OSError:
            self.peer = "?"

    async def recv_into(
        self, view: memoryview, *, timeout: float = math.inf, at_least: int = 1
    ) -> int:
        """Receive into ``view``; 0 means the peer closed its side. ``timeout``: seconds to wait
        for the first byte (``TimeoutError``); the scope exists only while waiting.
        ``at_least``: bytes the peer is sure to send; fewer than that (up to ``_WAIT_FOR``) already
        there, the socket waits for them (SO_RCVLOWAT) rather than take each segment as it lands
        (a receiver faster than its sender otherwise reads 4 MiB in 20-odd receives).
        """
        due = min(at_least, len(view), _WAIT_FOR) if self._tcp else 1
        if due > 1 and _readable(self.sock) < due:
            await self._wait_readable(timeout, due)
        poll_until = 0.0  # while polling: when the poll gives up and sleeps on readiness
        while True:
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ConnectionLost(f"receive from {self.peer} failed: {exc}") from exc
            else:
                if poll_until:
                    return n  # a poll's tries yielded already
                # Bytes that are already there come back without a trip through the event loop;
                # so that a peer streaming without a pause cannot starve every other task,
                # every _FAIR_RECEIVES-th such receive yields once.
                self._streak += 1
                if self._streak >= _FAIR_RECEIVES:
                    self._streak = 0
                    await anyio.lowlevel.checkpoint()
                return n
            self._streak = 0
            if due == 1 and self.poll > 0:
                now = time.monotonic()
                if not poll_until:
                    poll_until = now + self.poll
                if now < poll_until:  # try again after the loop's other tasks (see POLL)
                    os.sched_yield()
                    await anyio.lowlevel.checkpoint()
                    continue
            await self._wait_readable(timeout, due)
            poll_until = 0.0

    async def _wait_readable(self, timeout: float, due: int) -> None:
        if due != self._low_water:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, due)
            self._low_water = due
        try:
            if timeout == math.inf:
                await anyio.wait_readable(self.sock)
            else:
                with anyio.fail_after(timeout):
                    await anyio.wait_readable(self.sock)
        except TimeoutError:
            if due > 1 and _readable(self.sock) > 0:
                return  # slow, not stalled: take what came
            raise
        except (anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"connection to {self.peer} closed") from exc

    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        started = False
        while views:
            try:
                sent = self.sock.sendmsg(views[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise ConnectionLost(f"send to {self.peer} failed: {exc}") from exc
            started = started or sent > 0
            views = _advance(views, sent)
            if views:
                try:
                    with anyio.fail_after(self.send_stall_timeout):
                        await anyio.wait_writable(self.sock)
                except TimeoutError:  # before OSError, its base class
                    await self.aclose()
                    raise ConnectionLost(
                        f"{self.peer} accepted no data for {self.send_stall_timeout}s"
                    ) from None
                except (anyio.ClosedResourceError, OSError) as exc:
                    raise ConnectionLost(f"connection to {self.peer} closed") from exc
                except BaseException:
                    if started:
                        # Cancelled with half a PDU on the wire: the stream cannot go on.
                        self.closed = True
                        anyio.notify_closing(self.sock)
                        self.sock.close()
                    raise

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        anyio.notify_closing(self.sock)
        self.sock.close()
        await anyio.lowlevel.checkpoint()


def _readable(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue."""
    try:
        (count,) = _INT.unpack(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(_INT.size)))
    except OSError:
        return 0  # closed: the receive that follows says so
    return int(count)


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    i = 0
    while i < len(views) and sent >= len(views[i]):
        sent -= len(views[i])
        i += 1
    rest = views[i:]
    if sent and rest:
        rest[0] = rest[0][sent:]
    return rest


def _format_address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


async def open_tcp(host: str, port: int, *, poll: float | None = None) -> AsyncSocket:
    """Connect to ``host:port`` without blocking the event loop; ``poll``: see ``POLL`` (a host
    passes ``connector=functools.partial(open_tcp, poll=0)`` to sleep at once)."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionLost(f"cannot resolve {host}:{port}: {exc}") from exc
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(sockaddr)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
            return AsyncSocket(sock, poll=poll)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise ConnectionLost(f"cannot connect to {host}:{port}: {last}")


class TcpListener:
    """A listening socket whose ``accept`` awaits readiness."""

    def __init__(self, host: str, port: int, *, backlog: int = 128) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        name = self.sock.getsockname()
        self.host: str = name[0]
        self.port: int = name[1]

    async def accept(self) -> AsyncSocket:
        while True:
            try:
                conn, _ = self.sock.accept()
                return AsyncSocket(conn)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_readable(self.sock)
            except OSError as exc:
                # EMFILE and friends: back off rather than spin; the listener stays up.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await anyio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise

    async def aclose(self) -> None:
        anyio.notify_closing(self.sock)
        self.sock.close()
        await anyio.lowlevel.checkpoint()
