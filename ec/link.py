"""One target of a cluster as the initiator sees it: a lazily connected controller, raw fragment
store/retrieve/delete/list on its KV namespace, and "down with backoff" when it fails.

A target that refuses a connection, loses it, or lets a command time out is marked down and not
tried again until its backoff passes (doubling from ``backoff_initial`` to ``backoff_max``); until
then every operation on it fails at once with ``TargetUnavailable``, so a dead target costs the
cluster one timeout, not one per operation.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence

import anyio
import attrs

from ec.clustermap import TargetEntry
from kvext.spec import (
    KV_CSI,
    KvStatus,
    decode_key_list,
    delete_command,
    list_command,
    retrieve_command,
    store_command,
)
from nvmeof.errors import (
    CommandTimeout,
    ConnectionLost,
    KeyNotFound,
    NvmeError,
    NvmeofError,
    ProtocolError,
)
from nvmeof.initiator.controller import Controller
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.status import StatusCodeType

log = logging.getLogger("ec.link")

_LIST_PAGE = 1024
_LIST_ENTRY_MAX = 20  # u16 length + 16-byte key, padded to 4 bytes


class TargetUnavailable(NvmeofError):
    """The target is down (or just failed): its fragment cannot be read or written now."""


class LinkState(enum.Enum):
    NEW = "new"  # never connected yet
    UP = "up"
    DOWN = "down"


@attrs.frozen
class LinkOptions:
    connect_timeout: float = 2.0
    command_timeout: float = 10.0
    io_queues: int = 2
    queue_depth: int = 32
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class TargetLink:
    def __init__(
        self,
        entry: TargetEntry,
        options: LinkOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.entry = entry
        self.options = options
        self.clock = clock
        self.state = LinkState.NEW
        self.controller: Controller | None = None
        self.nsid = 0
        self.failures = 0
        self.next_attempt = 0.0
        self.last_error = ""
        self._lock = anyio.Lock()

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def available(self) -> bool:
        """Worth trying now: connected, or never tried, or its backoff has passed."""
        return self.controller is not None or self.clock() >= self.next_attempt

    def retry_in(self) -> float:
        return max(0.0, self.next_attempt - self.clock()) if self.state is LinkState.DOWN else 0.0

    # --- connection -------------------------------------------------------------------------
    def _unavailable(self) -> TargetUnavailable:
        return TargetUnavailable(
            f"target {self.name} ({self.entry.host}:{self.entry.port}) is down"
            f" ({self.last_error}); next try in {self.retry_in():.1f}s"
        )

    async def connect(self) -> Controller:
        if self.controller is not None:
            return self.controller
        if not self.available:
            raise self._unavailable()
        async with self._lock:
            if self.controller is not None:
                return self.controller
            if not self.available:
                raise self._unavailable()
            timeout = self.options.connect_timeout
            try:
                with anyio.fail_after(timeout):
                    ctrl = await Controller.connect(
                        self.entry.address,
                        self.entry.subnqn,
                        io_queues=self.options.io_queues,
                        queue_depth=self.options.queue_depth,
                        timeout=timeout,
                    )
            except (OSError, TimeoutError, NvmeofError) as exc:
                self._mark_down(f"connect: {exc or type(exc).__name__}")
                raise self._unavailable() from exc
            kv = [n for n, info in sorted(ctrl.namespaces.items()) if info.csi == KV_CSI]
            if not kv:
                with anyio.CancelScope(shield=True):
                    await ctrl.close(shutdown=False)
                self._mark_down("no key-value namespace")
                raise self._unavailable()
            self.nsid = kv[0]
            self.controller = ctrl
            if self.state is LinkState.DOWN:
                log.info("target %s is back after %d failures", self.name, self.failures)
            self.state = LinkState.UP
            self.failures = 0
            return ctrl

    def _mark_down(self, reason: str) -> None:
        self.failures += 1
        backoff = min(
            self.options.backoff_max, self.options.backoff_initial * 2 ** (self.failures - 1)
        )
        self.next_attempt = self.clock() + backoff
        self.last_error = reason
        if self.state is not LinkState.DOWN:
            log.warning("target %s is down: %s", self.name, reason)
        self.state = LinkState.DOWN

    async def _drop(self, ctrl: Controller, reason: str) -> None:
        if self.controller is ctrl:
            self.controller = None
            self._mark_down(reason)
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            await ctrl.close(shutdown=False)

    async def aclose(self) -> None:
        ctrl, self.controller = self.controller, None
        if ctrl is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await ctrl.close(shutdown=True)

    # --- commands ---------------------------------------------------------------------------
    async def _execute(
        self,
        command: Command,
        what: str,
        *,
        out: Sequence[bytes | memoryview] = (),
        into: Sequence[memoryview] = (),
    ) -> Completion:
        ctrl = await self.connect()
        try:
            completion = await ctrl.execute_io(
                command, out=out, into=into, timeout=self.options.command_timeout, check=False
            )
        except (ConnectionLost, CommandTimeout, ProtocolError, OSError) as exc:
            await self._drop(ctrl, f"{what}: {exc or type(exc).__name__}")
            raise self._unavailable() from exc
        status = completion.status
        if not status.success:
            if status.sct == StatusCodeType.GENERIC and status.sc == KvStatus.KEY_DOES_NOT_EXIST:
                raise KeyNotFound(status, f"{what} on {self.name}")
            raise NvmeError(status, f"{what} on {self.name}")
        return completion

    async def store(self, key: bytes, buffers: Sequence[bytes | memoryview]) -> None:
        size = sum(len(b) for b in buffers)
        await self.connect()  # the namespace id is known once connected
        await self._execute(store_command(self.nsid, key, size), "store", out=buffers)

    async def retrieve(self, key: bytes, size: int) -> memoryview:
        """The whole value under ``key``, read into ``size`` bytes first, again if it is larger."""
        await self.connect()
        for _ in range(3):
            buf = bytearray(size)
            completion = await self._execute(
                retrieve_command(self.nsid, key, size), "retrieve", into=[memoryview(buf)]
            )
            if completion.dw0 <= size:
                return memoryview(buf)[: completion.dw0]
            size = completion.dw0
        raise NvmeofError(f"value of {key.hex()} on {self.name} kept changing size")

    async def retrieve_prefix(self, key: bytes, size: int) -> tuple[memoryview, int]:
        """The first ``size`` bytes under ``key`` and the whole value's length."""
        await self.connect()
        buf = bytearray(size)
        completion = await self._execute(
            retrieve_command(self.nsid, key, size), "retrieve", into=[memoryview(buf)]
        )
        return memoryview(buf)[: min(size, completion.dw0)], completion.dw0

    async def delete(self, key: bytes) -> None:
        await self.connect()
        await self._execute(delete_command(self.nsid, key), "delete")

    async def list_all(self) -> list[bytes]:
        """Every key on the target (paged through List)."""
        await self.connect()
        keys: list[bytes] = []
        start = b""
        while True:
            size = 4 + _LIST_PAGE * _LIST_ENTRY_MAX
            buf = bytearray(size)
            await self._execute(
                list_command(self.nsid, size, start_key=start), "list", into=[memoryview(buf)]
            )
            page = decode_key_list(buf)
            if start and page and page[0] == start:
                page = page[1:]
            if not page:
                return keys
            keys += page
            start = page[-1]
