"""Fuzz targets: the PDU stream decoders (both roles), the capsule/data decoders, the auth
messages, and the target's command dispatch.

The invariant for every target: decode or raise our protocol error (``ProtocolError`` /
``PduError``, ``AuthMessageError``, ``ValueError`` subclasses the decoders document, or a
``CommandError`` status from dispatch), never anything else, never a hang. Each target is a plain
function of ``bytes``, so ``run.py`` drives it under atheris and ``test_regressions.py`` replays
every saved input without it.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Sequence

import anyio

from kvext.framing import FramingError, ValueHeader
from kvext.spec import decode_key_list
from nvmeof.errors import CommandError, ConnectionLost, ProtocolError
from nvmeof.spec.auth import AuthMessageError, decode_message
from nvmeof.spec.command import AdminOpcode, Command
from nvmeof.spec.completion import Completion
from nvmeof.spec.discovery import DiscoveryEntry, DiscoveryLogHeader
from nvmeof.spec.fabrics import ConnectData, ConnectDataError, connect_command
from nvmeof.spec.identify import IdentifyController, IdentifyNamespace
from nvmeof.tcp.connection import ControllerConnection, HostConnection
from nvmeof.transport.base import Buffer, Request

MAX_EVENTS = 10_000  # a decoder producing more events than bytes would be a bug (or a hang)


def _drain(conn: ControllerConnection | HostConnection, data: bytes) -> None:
    try:
        conn.receive_data(data)
    except ProtocolError:
        return
    events = 0
    while conn.next_event() is not None:
        events += 1
        assert events < MAX_EVENTS, "event storm"
    conn.data_to_send()


def pdu_stream_controller(data: bytes) -> None:
    """Bytes from a host, as the target's sans-IO connection sees them (chunked by byte 0)."""
    if not data:
        return
    conn = ControllerConnection(receive_buffer_size=4096)
    step = data[0] or 1
    body = data[1:]
    for i in range(0, len(body), step):
        _drain(conn, body[i : i + step])
        if conn.state.value in ("ERROR", "CLOSED"):
            return


def pdu_stream_host(data: bytes) -> None:
    """Bytes from a controller, after our ICReq, as the initiator's connection sees them."""
    conn = HostConnection()
    conn.initiate()
    conn.data_to_send()
    _drain(conn, data)


def capsules(data: bytes) -> None:
    """SQE/CQE/Connect data/identify/discovery/KV list/value header/auth message decoders."""
    if len(data) >= 64:
        Command.unpack_from(data)
    if len(data) >= 16:
        Completion.unpack_from(data)
    with contextlib.suppress(ConnectDataError):
        ConnectData.unpack(data)
    with contextlib.suppress(AuthMessageError):
        decode_message(data)
    for decode in (
        DiscoveryLogHeader.unpack,
        DiscoveryEntry.unpack,
        IdentifyController.unpack,
        IdentifyNamespace.unpack,
        decode_key_list,
        ValueHeader.unpack,
    ):
        # Short/garbled structures raise ValueError (struct.error for a buffer shorter than a
        # fixed layout, which the callers size themselves); nothing else may escape.
        with contextlib.suppress(ValueError, FramingError, struct.error):
            decode(data)  # type: ignore[operator]


# --- the target's command dispatch ----------------------------------------------------------------
class _FuzzChannel:
    """A controller channel that answers pulls from the fuzz input and drops completions."""

    trtype = "fuzz"
    peer = "fuzz"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    async def run(self, on_request: Callable[[Request], None]) -> None:
        return

    async def pull(self, request: Request, into: memoryview) -> None:
        source = request.in_capsule if request.in_capsule is not None else self.data
        chunk = source[: len(into)]
        into[: len(chunk)] = chunk

    async def complete(
        self, request: Request, completion: Completion, data: Sequence[Buffer] = ()
    ) -> None:
        return

    def set_max_in_capsule_data(self, size: int) -> None:
        return

    async def aclose(self) -> None:
        self.closed = True


def _target() -> object:
    from nvmeof.testing import make_block_target

    return make_block_target(kv=True, num_blocks=64)


async def _dispatch(data: bytes) -> None:
    from nvmeof.spec.fabrics import DISCOVERY_NQN
    from nvmeof.target.queue import QueueSession
    from nvmeof.testing import TEST_NQN

    target = _target()
    subnqn = DISCOVERY_NQN if data[:1] == b"\xff" else TEST_NQN
    channel = _FuzzChannel(data[64 * 8 :])
    async with anyio.create_task_group() as tg:
        session = QueueSession(target, channel, tg)  # type: ignore[arg-type]
        connect = ConnectData(hostid=bytes(16), cntlid=0xFFFF, subnqn=subnqn, hostnqn="nqn.fuzz")
        await session.execute(
            Request(connect_command(qid=0, sqsize=31), memoryview(connect.pack()))
        )
        cc_enable = Command(
            opcode=AdminOpcode.FABRICS, nsid=0, cdw10=0, cdw11=0x14, cdw12=0x00460061
        )
        for raw in [cc_enable.to_bytes()] + [data[i : i + 64] for i in range(0, 64 * 8, 64)]:
            if len(raw) < 64:
                break
            cmd = Command.unpack_from(raw)
            in_capsule = memoryview(data[64 * 8 : 64 * 8 + 8192]) if raw[1] & 1 else None
            try:
                with anyio.fail_after(2):
                    await session.execute(Request(cmd, in_capsule))
            except (CommandError, ConnectionLost):
                pass
        session.teardown()
        tg.cancel_scope.cancel()


def dispatch(data: bytes) -> None:
    """Up to 8 SQEs from the input through a connected admin queue's ``QueueSession.execute``
    (then the rest of the input as their data). TimeoutError = a hang = a finding."""
    anyio.run(_dispatch, data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "pdu_stream_controller": pdu_stream_controller,
    "pdu_stream_host": pdu_stream_host,
    "capsules": capsules,
    "dispatch": dispatch,
}
