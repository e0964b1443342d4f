"""NVMe/TCP framing over Unix stream sockets: the private channel between a target's workers.

The same ``AsyncSocket`` as TCP (``recv_into`` into the destination, ``sendmsg`` of views), only
another address family: PDUs do not care what carries them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

import anyio
import anyio.lowlevel

from nvmeof.errors import ConnectionLost
from nvmeof.transport.sockets import AsyncSocket


async def open_unix(path: str) -> AsyncSocket:
    """Connect to the Unix stream socket ``path`` without blocking the event loop."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            sock.connect(path)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
        return AsyncSocket(sock)
    except OSError as exc:
        sock.close()
        raise ConnectionLost(f"cannot connect to {path}: {exc}") from exc
    except BaseException:
        sock.close()
        raise


class UnixListener:
    """A listening Unix stream socket at ``path`` (removed again by ``aclose``)."""

    def __init__(self, path: str, *, backlog: int = 128) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            os.chmod(path, 0o600)
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    async def accept(self) -> AsyncSocket:
        while True:
            try:
                conn, _ = self.sock.accept()
                return AsyncSocket(conn)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_readable(self.sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await anyio.sleep(0.1)
                    continue
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise

    async def aclose(self) -> None:
        anyio.notify_closing(self.sock)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        await anyio.lowlevel.checkpoint()
