"""The receive fast path (a CapsuleResp on the host, a CapsuleCmd on the controller, whole in the
buffer) must do exactly what the general checks do: same events, same errors, same TermReq,
on any bytes that start like the fast shape. Checked against the same connection with the fast
path switched off."""

from __future__ import annotations

import struct

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from nvmeof.errors import PduError
from nvmeof.tcp.connection import ControllerConnection, HostConnection
from nvmeof.tcp.pdu import PduFlags, PduType

from .test_tcp_connection import (
    c2h,
    capsule,
    drain,
    make_cqe,
    make_sqe,
    ready_controller,
    ready_host,
)

_CH = struct.Struct("<BBBBI")


def _outcome(conn: HostConnection | ControllerConnection, data: bytes) -> tuple[object, ...]:
    try:
        conn.receive_data(data)
        error = None
    except PduError as exc:
        error = (exc.fes, exc.fei)
    events = [
        (
            type(e).__name__,
            {
                k: bytes(v) if isinstance(v, memoryview) else v
                for k, v in attrs.asdict(e, recurse=False).items()
            },
        )
        for e in drain(conn)
    ]
    return (error, events, b"".join(bytes(b) for b in conn.data_to_send()), conn.state)


def _both(
    make: type[HostConnection] | type[ControllerConnection],
    data: bytes,
    *,
    reads: tuple[int, ...] = (),
    max_icd: int | None = None,
) -> None:
    """Feed ``data`` to a connection with the fast path and to one without; on the host,
    commands 0, 1, ... first registered to read ``reads[i]`` bytes each."""
    fast = ready_host() if make is HostConnection else ready_controller()
    slow = ready_host() if make is HostConnection else ready_controller()
    landed: dict[int, list[bytearray]] = {id(fast): [], id(slow): []}
    for conn in (fast, slow):
        if max_icd is not None:
            assert isinstance(conn, ControllerConnection)
            conn.set_max_in_capsule_data(max_icd)
        for cid, size in enumerate(reads):
            assert isinstance(conn, HostConnection)
            buf = bytearray(size)
            landed[id(conn)].append(buf)
            conn.send_command(make_sqe(cid), read_into=[memoryview(buf)])
            conn.data_to_send()
    assert fast._fast_prefix, "the fast path is on for a connection without digests"
    slow._fast_prefix = ()
    assert _outcome(fast, data) == _outcome(slow, data)
    assert landed[id(fast)] == landed[id(slow)]


def test_fast_shapes_give_the_same_events() -> None:
    responses = b"".join(
        _CH.pack(PduType.CAPSULE_RESP, 0, 24, 0, 24) + make_cqe(c, c * 3) for c in range(9)
    )
    _both(HostConnection, responses)
    commands = capsule(1) + capsule(2, b"x" * 4096) + capsule(3) + capsule(4, b"y" * 100)
    _both(ControllerConnection, commands)


@settings(max_examples=400, deadline=None)
@given(
    pdo=st.sampled_from([0, 4, 24, 28, 72, 76, 80, 255]),
    plen=st.one_of(st.integers(0, 200), st.sampled_from([72, 73, 8264, 8265, 1 << 20])),
    body=st.binary(min_size=0, max_size=300),
    max_icd=st.sampled_from([0, 100, 8192]),
)
def test_capsule_cmd_lookalikes(pdo: int, plen: int, body: bytes, max_icd: int) -> None:
    data = _CH.pack(PduType.CAPSULE_CMD, 0, 72, pdo, plen) + body
    _both(ControllerConnection, data, max_icd=max_icd)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=0, max_size=80), tail=st.binary(min_size=0, max_size=40))
def test_capsule_resp_lookalikes(body: bytes, tail: bytes) -> None:
    data = _CH.pack(PduType.CAPSULE_RESP, 0, 24, 0, 24) + body + tail
    _both(HostConnection, data)


def test_c2h_data_fast_path_gives_the_same_events() -> None:
    data = (
        c2h(0, 0, b"a" * 100, flags=0)
        + c2h(0, 100, b"b" * 50)
        + _CH.pack(PduType.CAPSULE_RESP, 0, 24, 0, 24)
        + make_cqe(0, 150)
        + c2h(1, 0, b"c" * 4096, flags=PduFlags.LAST_PDU | PduFlags.SUCCESS)
    )
    _both(HostConnection, data, reads=(150, 4096))


@settings(max_examples=400, deadline=None)
@given(
    flags=st.sampled_from([0, PduFlags.LAST_PDU, PduFlags.LAST_PDU | PduFlags.SUCCESS]),
    plen=st.integers(0, 140),
    cccid=st.integers(0, 3),
    datao=st.sampled_from([0, 1, 50, 100]),
    datal=st.sampled_from([0, 1, 50, 100, 116]),
    body=st.binary(min_size=0, max_size=160),
)
def test_c2h_lookalikes(
    flags: int, plen: int, cccid: int, datao: int, datal: int, body: bytes
) -> None:
    header = _CH.pack(PduType.C2H_DATA, flags, 24, 24, plen) + struct.pack(
        "<HHIII", cccid, 0, datao, datal, 0
    )
    _both(HostConnection, header + body, reads=(100, 50))
