"""QueuePair against a scripted channel: CIDs, many commands in flight, timeouts, lost links.

The command seam (httpx's MockTransport): no sockets, the channel records submissions and the
test decides when each completion arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import anyio
import pytest

from nvmeof.errors import CommandTimeout, ConnectionLost, NvmeError
from nvmeof.initiator.queue import QueuePair
from nvmeof.spec.command import Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.status import GenericStatus, Status
from nvmeof.transport.base import Buffer

pytestmark = pytest.mark.anyio


class ScriptedChannel:
    trtype = "scripted"
    peer = "script"
    max_in_capsule_data = 8192

    def __init__(self) -> None:
        self.submitted: list[tuple[int, Command]] = []
        self.forgotten: list[int] = []
        self.reads = 0
        self._send, self._receive = anyio.create_memory_object_stream[Completion | None](100)
        self.closed = False

    async def submit(
        self,
        command: Command,
        *,
        cid: int,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
    ) -> None:
        self.submitted.append((cid, command))

    def next_completion_nowait(self) -> Completion | None:
        return None  # every completion comes through the (counted) awaited read

    async def next_completion(self) -> Completion:
        self.reads += 1
        item = await self._receive.receive()
        if item is None:
            raise ConnectionLost("scripted link dropped")
        return item

    def complete(self, cid: int, status: Status | None = None, dw0: int = 0) -> None:
        self._send.send_nowait(Completion(cid=cid, status=status or Status(), dw0=dw0))

    def drop(self) -> None:
        self._send.send_nowait(None)

    def close_streams(self) -> None:
        self._send.close()
        self._receive.close()

    def forget(self, cid: int) -> None:
        self.forgotten.append(cid)

    async def aclose(self) -> None:
        self.closed = True


async def _settled(predicate: Callable[[], object]) -> None:
    """Let every other task run until it blocks, then check where things stand."""
    await anyio.wait_all_tasks_blocked()
    assert predicate()


@pytest.fixture
def channel() -> Iterator[ScriptedChannel]:
    scripted = ScriptedChannel()
    yield scripted
    scripted.close_streams()


async def test_many_commands_in_flight_complete_out_of_order(channel: ScriptedChannel) -> None:
    queue = QueuePair(channel, qid=1, depth=8)
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        completion = await queue.execute(Command(opcode=0x02, nsid=i))
        results[i] = completion.dw0

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
        await _settled(lambda: len(channel.submitted) == 8)
        assert queue.in_flight == 8
        cids = [cid for cid, _ in channel.submitted]
        assert sorted(cids) == list(range(8))  # distinct CIDs, all slots used
        for cid, command in reversed(channel.submitted):
            channel.complete(cid, dw0=100 + command.nsid)
    assert results == {i: 100 + i for i in range(8)}
    assert queue.peak_in_flight == 8
    assert queue.in_flight == 0


async def test_depth_bounds_the_commands_on_the_wire(channel: ScriptedChannel) -> None:
    queue = QueuePair(channel, qid=1, depth=2)
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(queue.execute, Command(opcode=0x02))
        completed = 0
        while completed < 5:
            # never more than two on the wire; the others wait for a slot
            await anyio.wait_all_tasks_blocked()
            assert 1 <= len(channel.submitted) - completed <= 2
            cid, _ = channel.submitted[completed]
            channel.complete(cid)
            completed += 1
    assert len(channel.submitted) == 5
    assert queue.peak_in_flight == 2


async def test_error_status_raises_with_the_status(channel: ScriptedChannel) -> None:
    queue = QueuePair(channel, qid=1, depth=4)
    status = Status.generic(GenericStatus.INVALID_FIELD)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_complete_first, channel, status)
        with pytest.raises(NvmeError) as info:
            await queue.execute(Command(opcode=0x02))
    assert info.value.status == status


async def _complete_first(channel: ScriptedChannel, status: Status) -> None:
    await _settled(lambda: channel.submitted)
    channel.complete(channel.submitted[0][0], status)


async def test_a_timed_out_cid_is_not_reused_until_its_late_completion(
    channel: ScriptedChannel,
) -> None:
    queue = QueuePair(channel, qid=1, depth=2)
    with pytest.raises(CommandTimeout):
        await queue.execute(Command(opcode=0x02), timeout=0.05)
    ((late_cid, _),) = channel.submitted
    assert channel.forgotten == [late_cid]  # its buffers were dropped at once
    # One slot is still held by the abandoned command: the next command gets the other CID.
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.execute, Command(opcode=0x02))
        await _settled(lambda: len(channel.submitted) == 2)
        second_cid = channel.submitted[1][0]
        assert second_cid != late_cid
        channel.complete(late_cid)  # the late completion frees the old CID ...
        channel.complete(second_cid)
    assert queue.in_flight == 0
    async with anyio.create_task_group() as tg:  # ... and both slots are usable again
        tg.start_soon(queue.execute, Command(opcode=0x02))
        tg.start_soon(queue.execute, Command(opcode=0x02))
        await _settled(lambda: len(channel.submitted) == 4)
        for cid, _ in channel.submitted[2:]:
            channel.complete(cid)


async def test_connection_lost_reaches_every_waiter(channel: ScriptedChannel) -> None:
    queue = QueuePair(channel, qid=1, depth=8)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await queue.execute(Command(opcode=0x02))
        except ConnectionLost as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(one)
        await _settled(lambda: len(channel.submitted) == 6)
        channel.drop()
    assert len(errors) == 6
    assert not queue.connected
    with pytest.raises(ConnectionLost):
        await queue.execute(Command(opcode=0x02))


async def test_one_reader_at_a_time_and_it_hands_over(channel: ScriptedChannel) -> None:
    """Whoever waits reads; when its own completion came, another waiter takes over reading."""
    queue = QueuePair(channel, qid=1, depth=4)
    done: list[int] = []

    async def one(i: int) -> None:
        await queue.execute(Command(opcode=0x02, nsid=i))
        done.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
        await _settled(lambda: len(channel.submitted) == 3)
        by_nsid = {command.nsid: cid for cid, command in channel.submitted}
        channel.complete(by_nsid[0])
        await _settled(lambda: done == [0])
        channel.complete(by_nsid[2])
        await _settled(lambda: done == [0, 2])
        channel.complete(by_nsid[1])
    assert done == [0, 2, 1]
    # reads: one per completion delivered, plus the reader parked on an empty stream at most
    assert channel.reads <= 4


async def test_a_short_timeout_expires_while_a_command_without_one_reads(
    channel: ScriptedChannel,
) -> None:
    """The reader reads under one scope for everybody: a later command with an earlier deadline
    shortens it, times out on time, and the reader reads on for its own completion."""
    queue = QueuePair(channel, qid=0, depth=4)
    outcome: list[str] = []
    hasty_done = anyio.Event()

    async def patient() -> None:  # an Asynchronous Event Request: no timeout, reads first
        await queue.execute(Command(opcode=0x0C))
        outcome.append("patient done")

    async def hasty() -> None:
        try:
            await queue.execute(Command(opcode=0x18), timeout=0.05)
        except CommandTimeout:
            outcome.append("hasty timed out")
        hasty_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(patient)
        await _settled(lambda: len(channel.submitted) == 1)
        tg.start_soon(hasty)
        with anyio.fail_after(5):
            await hasty_done.wait()
        assert outcome == ["hasty timed out"]
        hasty_cid = channel.submitted[1][0]
        assert channel.forgotten == [hasty_cid]
        channel.complete(channel.submitted[0][0])
    assert outcome == ["hasty timed out", "patient done"]
    assert queue.in_flight == 1  # the abandoned command keeps its CID until it completes


async def test_followers_time_out_together_and_the_queue_goes_on(channel: ScriptedChannel) -> None:
    queue = QueuePair(channel, qid=1, depth=8)
    timeouts = 0

    async def one() -> None:
        nonlocal timeouts
        try:
            await queue.execute(Command(opcode=0x02), timeout=0.05)
        except CommandTimeout:
            timeouts += 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert timeouts == 5
    for cid, _ in channel.submitted:
        channel.complete(cid)  # late completions free the CIDs
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.execute, Command(opcode=0x02))
        await _settled(lambda: len(channel.submitted) == 6)
        channel.complete(channel.submitted[5][0])
    assert queue.in_flight == 0


async def test_a_cancelled_waiter_passes_the_reading_on(channel: ScriptedChannel) -> None:
    """Cancel the reader: another waiter must take over, or its completion is never read."""
    queue = QueuePair(channel, qid=1, depth=4)
    second_done = anyio.Event()

    async def second() -> None:
        await queue.execute(Command(opcode=0x02, nsid=2))
        second_done.set()

    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as first:
            first.start_soon(queue.execute, Command(opcode=0x02, nsid=1))
            await _settled(lambda: len(channel.submitted) == 1)
            tg.start_soon(second)
            await _settled(lambda: len(channel.submitted) == 2)
            first.cancel_scope.cancel()  # the reader goes away mid-read
        channel.complete(channel.submitted[0][0])  # the cancelled one's late completion
        channel.complete(channel.submitted[1][0])
        with anyio.fail_after(5):
            await second_done.wait()
    assert queue.in_flight == 0  # the late completion was read and freed its CID


class DelegatingChannel(ScriptedChannel):
    """A channel whose reader hands pushing queued data to another waiter (as NVMe/TCP does
    for H2CData): ``delegate_send`` is what the reader calls; ``flush`` records who pushed."""

    def __init__(self) -> None:
        super().__init__()
        self.delegate_send: Callable[[], bool] | None = None
        self.pushes = 0
        self.undelegated = 0
        self.hold = anyio.Event()
        self.hold.set()

    async def flush(self) -> None:
        self.pushes += 1
        await self.hold.wait()

    def undelegate(self) -> None:
        self.undelegated += 1


async def test_the_reader_hands_pushing_to_another_waiter() -> None:
    channel = DelegatingChannel()
    queue = QueuePair(channel, qid=1, depth=4)
    assert channel.delegate_send is not None
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(queue.execute, Command(opcode=0x01, nsid=i))
        await _settled(lambda: len(channel.submitted) == 3)
        assert channel.delegate_send()  # the reader found data R2Ts queued
        await _settled(lambda: channel.pushes == 1)
        for cid, _ in channel.submitted:
            channel.complete(cid)
    assert queue.in_flight == 0
    channel.close_streams()


async def test_asked_again_while_pushing_it_pushes_again_before_returning() -> None:
    channel = DelegatingChannel()
    queue = QueuePair(channel, qid=1, depth=4)
    assert channel.delegate_send is not None
    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(queue.execute, Command(opcode=0x01, nsid=i))
        await _settled(lambda: len(channel.submitted) == 2)
        channel.hold = anyio.Event()  # the push blocks, as a send into a full socket does
        assert channel.delegate_send()
        await _settled(lambda: channel.pushes == 1)
        assert channel.delegate_send()  # more data queued meanwhile: the same waiter is asked
        for cid, _ in channel.submitted:
            channel.complete(cid)  # its completion arrives while it still pushes
        await anyio.wait_all_tasks_blocked()
        channel.hold.set()
    assert channel.pushes == 2  # it pushed the second time too, before it returned
    channel.close_streams()


async def test_a_push_asked_of_a_cancelled_waiter_is_not_lost() -> None:
    channel = DelegatingChannel()
    queue = QueuePair(channel, qid=1, depth=4)
    assert channel.delegate_send is not None
    follower_scope = anyio.CancelScope()

    async def follower() -> None:
        with follower_scope:
            await queue.execute(Command(opcode=0x01, nsid=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.execute, Command(opcode=0x01, nsid=0))  # becomes the reader
        await _settled(lambda: len(channel.submitted) == 1)
        tg.start_soon(follower)
        await _settled(lambda: len(channel.submitted) == 2)
        assert channel.delegate_send()  # the follower is asked to push ...
        follower_scope.cancel()  # ... and is cancelled: it pushes first, or gives it back
        await _settled(lambda: channel.pushes + channel.undelegated == 1)
        for cid, _ in channel.submitted:
            channel.complete(cid)
    # (the cancelled command keeps its CID until a reader reads its late completion)
    channel.close_streams()


class SlowSubmitChannel(DelegatingChannel):
    """The first submit blocks until ``release`` is set, as a task sending a megabyte does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()

    async def submit(
        self,
        command: Command,
        *,
        cid: int,
        out: Sequence[Buffer] = (),
        into: Sequence[memoryview] = (),
    ) -> None:
        await super().submit(command, cid=cid, out=out, into=into)
        if len(self.submitted) == 1:
            await self.release.wait()


async def test_a_waiter_still_submitting_is_not_asked_to_push() -> None:
    channel = SlowSubmitChannel()
    queue = QueuePair(channel, qid=1, depth=4)
    assert channel.delegate_send is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.execute, Command(opcode=0x01, nsid=0))  # stays inside submit
        await _settled(lambda: len(channel.submitted) == 1)
        assert not channel.delegate_send()  # the only waiter is the one sending: nobody else
        tg.start_soon(queue.execute, Command(opcode=0x01, nsid=1))
        tg.start_soon(queue.execute, Command(opcode=0x01, nsid=2))
        await _settled(lambda: len(channel.submitted) == 3)
        assert channel.delegate_send()  # one of the two others pushes
        await _settled(lambda: channel.pushes == 1)
        channel.release.set()
        for cid, _ in channel.submitted:
            channel.complete(cid)
    assert channel.pushes == 1  # the sender, once out of submit, was not asked as well
    assert queue.in_flight == 0
    channel.close_streams()
