"""Which I/O queue a command takes: small ones pack into the first queue with room (batches per
send and receive), large transfers go round robin (their streams side by side)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from nvmeof.errors import ConnectionLost
from nvmeof.initiator.controller import LARGE_TRANSFER, Controller
from nvmeof.initiator.queue import QueuePair


class _Idle:
    """A channel nothing is sent on: only the queues' bookkeeping is under test."""

    trtype = "idle"
    peer = "idle"
    max_in_capsule_data = 0


def _controller(queues: int, depth: int) -> tuple[Controller, list[QueuePair]]:
    ctrl = Controller.__new__(Controller)
    idle: Any = _Idle()
    pairs = [QueuePair(idle, qid=i + 1, depth=depth) for i in range(queues)]
    ctrl.io_queues = pairs
    ctrl._next_queue = itertools.cycle(range(queues))
    return ctrl, pairs


def test_small_commands_pack_into_the_first_queue_with_room() -> None:
    ctrl, pairs = _controller(3, depth=2)
    assert ctrl.queue(4096) is pairs[0]
    pairs[0]._waiters = {0: object(), 1: object()}  # type: ignore[dict-item]  # full
    assert ctrl.queue(4096) is pairs[1]
    pairs[1]._waiters = {0: object(), 1: object()}  # type: ignore[dict-item]
    assert ctrl.queue(0) is pairs[2]


def test_large_transfers_go_round_robin() -> None:
    ctrl, pairs = _controller(3, depth=8)
    chosen = [ctrl.queue(LARGE_TRANSFER) for _ in range(6)]
    assert chosen == pairs + pairs


def test_no_queue_is_a_lost_connection() -> None:
    ctrl, _ = _controller(0, depth=8)
    with pytest.raises(ConnectionLost):
        ctrl.queue(1)
