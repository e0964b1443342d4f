"""One queue pair on the host: CIDs, commands in flight, completions matched back to waiters.

No background task reads the socket. Whichever waiter finds nobody reading becomes the reader
(leader/follower): it reads completions, hands each to its waiter, and once its own has arrived
passes the reading on to another waiter. A lone command thus reads its own completion with no task
switch, and a controller needs no task group to live in, so ``await Controller.connect(...)`` works
on asyncio and trio alike.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence

import anyio

from nvmeof.errors import CommandTimeout, ConnectionLost, NvmeError
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.transport.base import Buffer, HostChannel, SendDelegating

log = logging.getLogger("nvmeof.initiator.queue")


class _Waiter:
    """One command's wait. ``signal`` is what it sleeps on: an asyncio future under asyncio (a
    tenth of what an ``anyio.Event`` costs to make, set and await), an ``anyio.Event`` elsewhere;
    a fresh one after each wake-up that was not its completion (a hand-over or a timeout)."""

    __slots__ = (
        "abandoned", "completion", "deadline", "error", "expired", "send", "signal", "submitting",
    )  # fmt: skip

    def __init__(self, signal: _Signal, deadline: float) -> None:
        self.signal = signal
        self.deadline = deadline
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.expired = False
        self.abandoned = False
        self.send = False  # woken to push the queue's queued data (see TcpHostChannel)
        self.submitting = True  # inside the channel's submit (it may be the one sending)

    @property
    def pending(self) -> bool:
        return self.completion is None and self.error is None and not self.expired


_Signal = asyncio.Future[None] | anyio.Event


class QueuePair:
    """Up to ``depth`` commands on the wire at once over one channel.

    Timeouts cost no cancel scope per command (anyio's cost several microseconds each, as much as
    the rest of a small command's work): each waiter carries a deadline, and the one reading
    reads under a single scope that ends at the earliest deadline of all. When it ends, every
    waiter past its deadline is woken to time out; the reader, unless it is one of them, reads on.
    """

    def __init__(self, channel: HostChannel, *, qid: int, depth: int, cntlid: int = 0) -> None:
        self.channel = channel
        self.qid = qid
        self.depth = depth
        self.cntlid = cntlid
        self._free = list(range(depth - 1, -1, -1))
        self._slots = anyio.Semaphore(depth)
        self._waiters: dict[int, _Waiter] = {}
        self._reading = False
        # the reader's scope, ending at the earliest deadline of all waiters
        self._stint: anyio.CancelScope | None = None
        self._lost: ConnectionLost | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bound = False
        self._reader: _Waiter | None = None
        self.peak_in_flight = 0
        self.log = logging.LoggerAdapter(log, {})
        # A TCP channel has a reader hand the pushing of R2T-queued data to another waiter.
        self._push: Callable[[], Awaitable[None]] | None = None
        if isinstance(channel, SendDelegating):
            channel.delegate_send = self._delegate_send
            self._push = channel.flush

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    @property
    def connected(self) -> bool:
        return self._lost is None

    # --- how waiters sleep, per event loop ----------------------------------------------------
    def _bind(self) -> None:
        """Learn the event loop on first use (the pair may be built outside it)."""
        self._bound = True
        self._loop = _asyncio_loop()

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else anyio.current_time()

    def _signal(self) -> _Signal:
        return self._loop.create_future() if self._loop is not None else anyio.Event()

    @staticmethod
    def _wake(waiter: _Waiter) -> None:
        signal = waiter.signal
        if isinstance(signal, asyncio.Future):
            if not signal.done():
                signal.set_result(None)
        else:
            signal.set()

    @staticmethod
    async def _sleep(waiter: _Waiter) -> None:
        signal = waiter.signal
        if isinstance(signal, asyncio.Future):
            await signal
        else:
            await signal.wait()

    # --- commands -----------------------------------------------------------------------------
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
        ``timeout`` bounds the wait for the completion; a send the peer does not drain is the
        connection's business (its socket's stall timeout), as the command is not on the wire.
        """
        if self._lost is not None:
            raise self._lost
        if not self._bound:
            self._bind()
        try:
            self._slots.acquire_nowait()  # no scheduler round trip while a slot is free
        except anyio.WouldBlock:
            await self._slots.acquire()
        if self._lost is not None:
            self._slots.release()
            raise self._lost
        cid = self._free.pop()
        deadline = math.inf if timeout is None else self._now() + timeout
        waiter = _Waiter(self._signal(), deadline)
        if self._stint is not None and deadline < self._stint.deadline:
            self._stint.deadline = deadline  # the reader must stop in time for this one too
        self._waiters[cid] = waiter
        if len(self._waiters) > self.peak_in_flight:
            self.peak_in_flight = len(self._waiters)
        finished = False
        try:
            await self.channel.submit(command, cid=cid, out=out, into=into)
            waiter.submitting = False
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
                if not self._reading:
                    # Cancelled right after being handed the reading: pass it on.
                    self._hand_off()
                if waiter.send:
                    # Cancelled before pushing the queued data it was asked to push.
                    waiter.send = False
                    self._redelegate()
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
            while waiter.send:  # before anything else: the reader counts on it
                waiter.send = False  # (and may ask again while we push)
                if self._push is not None:
                    await self._push()
            if waiter.completion is not None:
                return waiter.completion
            if waiter.error is not None:
                raise waiter.error
            if waiter.expired:
                raise TimeoutError
            if self._reading:
                await self._sleep(waiter)
                if waiter.pending:
                    waiter.signal = self._signal()  # woken to read, or to push data
                continue
            self._reading = True
            self._reader = waiter
            try:
                await self._read_until(waiter)
            except ConnectionLost as exc:
                self._fail_all(exc)
                raise
            finally:
                self._reading = False
                self._reader = None
                self._stint = None
                self._hand_off()

    async def _read_until(self, waiter: _Waiter) -> None:
        """Read completions until ``waiter``'s own arrives or it expires."""
        while waiter.pending:
            deadline = min(w.deadline for w in self._waiters.values() if w.pending)
            channel = self.channel
            with anyio.CancelScope(deadline=deadline) as self._stint:
                while waiter.completion is None:
                    completion = channel.next_completion_nowait()
                    if completion is None:
                        completion = await channel.next_completion()
                    self._deliver(completion)
            self._stint = None
            if waiter.completion is not None:
                return
            # The earliest deadline passed: wake whoever it was (the reader may be one).
            now = self._now()
            for other in self._waiters.values():
                if other.pending and other.deadline <= now:
                    other.expired = True
                    self._wake(other)

    def _delegate_send(self) -> bool:
        """Wake a waiter other than the reader to push the channel's queued data."""
        if self._push is None:
            return False
        for waiter in self._waiters.values():
            if (
                waiter.pending
                and not waiter.abandoned
                and not waiter.submitting
                and waiter is not self._reader
            ):
                waiter.send = True
                self._wake(waiter)
                return True
        return False

    def _redelegate(self) -> None:
        if self._delegate_send():
            return
        if isinstance(self.channel, SendDelegating):
            self.channel.undelegate()
        if self._stint is not None:
            self._stint.cancel()  # the reader may wait on data that waits on ours: wake it

    def _deliver(self, completion: Completion) -> None:
        waiter = self._waiters.get(completion.cid)
        if waiter is None:
            self.log.warning(
                "[%d/%d] completion for unknown cid %d", self.cntlid, self.qid, completion.cid
            )
            return
        waiter.completion = completion
        self._wake(waiter)
        if waiter.abandoned:
            self._release(completion.cid)

    def _hand_off(self) -> None:
        for waiter in self._waiters.values():
            if waiter.pending and not waiter.abandoned:
                self._wake(waiter)
                return

    def _fail_all(self, exc: ConnectionLost) -> None:
        self._lost = exc
        for cid, waiter in list(self._waiters.items()):
            waiter.error = exc
            self._wake(waiter)
            if waiter.abandoned:
                self._release(cid)

    async def aclose(self) -> None:
        self._fail_all(self._lost or ConnectionLost(f"queue {self.qid} closed"))
        await self.channel.aclose()


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop when the caller runs on asyncio (anyio's asyncio backend), else
    None. sniffio says which library runs the task where it is installed (anyio no longer needs
    it); without it, a running asyncio loop in this thread is the answer."""
    try:
        import sniffio
    except ImportError:
        pass
    else:
        try:
            if sniffio.current_async_library() != "asyncio":
                return None
        except sniffio.AsyncLibraryNotFoundError:
            return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def raise_for_status(completion: Completion, what: str) -> Completion:
    if not completion.status.success:
        raise NvmeError(completion.status, what)
    return completion
