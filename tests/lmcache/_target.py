"""A GPUCache target served from a background thread, restartable on the same port."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import anyio
import anyio.from_thread

from nvmeof.target.server import TargetServer
from nvmeof.testing import TEST_NQN, make_kv_target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadTarget:
    """A DRAM KV target on 127.0.0.1:``port`` in its own thread and event loop."""

    def __init__(self, port: int | None = None, nqn: str = TEST_NQN) -> None:
        self.port = port or free_port()
        self.nqn = nqn
        self._stack: contextlib.ExitStack | None = None

    def url(self, query: str = "queues=2") -> str:
        return f"nvmeof://127.0.0.1:{self.port}/{self.nqn}?{query}"

    def start(self) -> None:
        stack = contextlib.ExitStack()
        portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
        started = threading.Event()

        async def serve(task_status: anyio.abc.TaskStatus[None]) -> None:
            server = TargetServer(make_kv_target(nqn=self.nqn))
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, "127.0.0.1", self.port)
                started.set()
                task_status.started()

        future, _ = portal.start_task(serve)
        stack.callback(future.cancel)
        self._stack = stack

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def restart(self) -> None:
        """A new, empty target on the same port (a DRAM target loses its data)."""
        self.stop()
        self.start()


@contextlib.contextmanager
def thread_target() -> Iterator[ThreadTarget]:
    target = ThreadTarget()
    target.start()
    try:
        yield target
    finally:
        target.stop()
