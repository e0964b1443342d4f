"""One queue pair on the host: CIDs, commands in flight, completions matched back to waiters.

No background task reads the socket. Whichever waiter finds nobody reading becomes the reader
(leader/follower): it reads completions, hands each to its waiter, and once its own has arrived
passes the reading on to another waiter. A lone command thus reads its own completion with no task
switch, and a controller needs no task group to live in, so ``await Controller.connect(...)`` works
on asyncio and trio alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import anyio

from nvmeof.errors import CommandTimeout, ConnectionLost, NvmeError
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.transport.base import Buffer, HostChannel

log = logging.getLogger("nvmeof.initiator.queue")


class _Waiter:
    __slots__ = ("abandoned", "completion", "error", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.abandoned = False


class QueuePair:
    """Up to ``depth`` commands on the wire at once over one channel."""

    def __init__(self, channel: HostChannel, *, qid: int, depth: int, cntlid: int = 0) -> None:
        self.channel = channel
        self.qid = qid
        self.depth = depth
        self.cntlid = cntlid
        self._free = list(range(depth - 1, -1, -1))
        self._slots = anyio.Semaphore(depth)
        self._waiters: dict[int, _Waiter] = {}
        self._reading = False
        self._lost: ConnectionLost | None = None
        self.peak_in_flight = 0
        self.log = logging.LoggerAdapter(log, {})

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    @property
    def connected(self) -> bool:
        return self._lost is None

    async def execute(
        self,
        command: Command,
        *,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
        timeout: float | None = None,
        check: bool = True,
    ) -> Completion:
        """Submit ``command`` and wait for its completion.

        ``out`` is data for the controller, ``into`` where the controller's data lands (the
        caller's buffers, used in place). With ``check``, an error status raises ``NvmeError``.
        """
        if self._lost is not None:
            raise self._lost
        try:
            self._slots.acquire_nowait()  # no scheduler round trip while a slot is free
        except anyio.WouldBlock:
            await self._slots.acquire()
        if self._lost is not None:
            self._slots.release()
            raise self._lost
        cid = self._free.pop()
        waiter = _Waiter()
        self._waiters[cid] = waiter
        self.peak_in_flight = max(self.peak_in_flight, len(self._waiters))
        finished = False
        try:
            with anyio.fail_after(math.inf if timeout is None else timeout):
                await self.channel.submit(command, cid=cid, out=out, into=into)
                completion = await self._wait(waiter)
            finished = True
        except TimeoutError:
            self.log.warning(
                "[%d/%d] cid %d opcode 0x%02x timed out after %ss",
                self.cntlid,
                self.qid,
                cid,
                command.opcode,
                timeout,
            )
            raise CommandTimeout(
                f"opcode 0x{command.opcode:02x} on queue {self.qid} timed out after {timeout}s"
            ) from None
        finally:
            if finished or waiter.error is not None or self._lost is not None:
                self._release(cid)
            else:
                # The command may still complete later: keep its CID (and slot) until it does,
                # and drop its buffers now, since the caller takes them back.
                waiter.abandoned = True
                self.channel.forget(cid)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "[%d/%d] cid %d opcode 0x%02x nsid %d -> %s dw0 0x%x",
                self.cntlid, self.qid, cid, command.opcode, command.nsid,
                completion.status, completion.dw0,
            )  # fmt: skip
        if check and not completion.status.success:
            raise NvmeError(completion.status, f"opcode 0x{command.opcode:02x}")
        return completion

    def _release(self, cid: int) -> None:
        if self._waiters.pop(cid, None) is not None:
            self._free.append(cid)
            self._slots.release()

    async def _wait(self, waiter: _Waiter) -> Completion:
        while True:
            if waiter.completion is not None:
                return waiter.completion
            if waiter.error is not None:
                raise waiter.error
            if self._reading:
                await waiter.event.wait()
                if waiter.completion is None and waiter.error is None:
                    waiter.event = anyio.Event()  # woken to take over reading
                continue
            self._reading = True
            try:
                while waiter.completion is None:
                    self._deliver(await self.channel.next_completion())
            except ConnectionLost as exc:
                self._fail_all(exc)
                raise
            finally:
                self._reading = False
                self._hand_off()

    def _deliver(self, completion: Completion) -> None:
        waiter = self._waiters.get(completion.cid)
        if waiter is None:
            self.log.warning(
                "[%d/%d] completion for unknown cid %d", self.cntlid, self.qid, completion.cid
            )
            return
        waiter.completion = completion
        waiter.event.set()
        if waiter.abandoned:
            self._release(completion.cid)

    def _hand_off(self) -> None:
        for waiter in self._waiters.values():
            if waiter.completion is None and waiter.error is None and not waiter.abandoned:
                waiter.event.set()
                return

    def _fail_all(self, exc: ConnectionLost) -> None:
        self._lost = exc
        for cid, waiter in list(self._waiters.items()):
            waiter.error = exc
            waiter.event.set()
            if waiter.abandoned:
                self._release(cid)

    async def aclose(self) -> None:
        self._fail_all(self._lost or ConnectionLost(f"queue {self.qid} closed"))
        await self.channel.aclose()


def raise_for_status(completion: Completion, what: str) -> Completion:
    if not completion.status.success:
        raise NvmeError(completion.status, what)
    return completion
