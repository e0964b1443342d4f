"""Large in-capsule data lands where the controller's allocator says (a KV Store: the engine's own
value buffer), and the command arrives carrying that very buffer."""

from __future__ import annotations

import pytest

from nvmeof.tcp.connection import CommandReceived

from .test_tcp_connection import capsule, drain, pattern, ready_controller

SIZE = 200 * 1024  # more than the receive buffer holds: it is still to come when its header is read


def test_in_capsule_data_lands_in_the_allocated_buffer() -> None:
    ctrl = ready_controller()
    ctrl.set_max_in_capsule_data(1 << 20)
    asked: list[tuple[int, int, int]] = []
    lent: list[memoryview] = []

    def allocate(sqe: memoryview, size: int) -> memoryview:
        asked.append((sqe[0], int.from_bytes(sqe[2:4], "little"), size))
        view = memoryview(bytearray(size + 64))[:size]
        lent.append(view)
        return view

    ctrl.allocate_in_capsule = allocate
    data = pattern(SIZE, seed=3)
    ctrl.receive_data(capsule(7, data))
    events = drain(ctrl)
    assert asked == [(0x01, 7, SIZE)]
    assert len(events) == 1
    assert isinstance(events[0], CommandReceived)
    assert events[0].data is lent[0]
    assert bytes(lent[0]) == data


def test_without_an_allocator_the_connection_allocates() -> None:
    ctrl = ready_controller()
    ctrl.set_max_in_capsule_data(1 << 20)
    data = pattern(SIZE, seed=5)
    ctrl.receive_data(capsule(9, data))
    (event,) = drain(ctrl)
    assert isinstance(event, CommandReceived)
    assert event.data is not None
    assert bytes(event.data) == data


def test_an_allocator_that_gives_the_wrong_size_is_a_bug_said_plainly() -> None:
    ctrl = ready_controller()
    ctrl.set_max_in_capsule_data(1 << 20)
    ctrl.allocate_in_capsule = lambda sqe, size: bytearray(size - 1)
    with pytest.raises(ValueError, match="allocator gave"):
        ctrl.receive_data(capsule(1, pattern(SIZE)))
