"""The keep-alive timer while the admin queue authenticates (found against Linux 6.12 in the lab).

A host cannot send Keep Alive before it has authenticated (the target answers Authentication
Required), and Linux computes between the Challenge and its Reply: under QEMU TCG ffdhe8192 takes
longer than the default 5 s KATO. The target used to tear the controller down meanwhile, and the
kernel then waited 60 s for its Reply to time out. Each authentication message now holds the timer
(``AUTH_KEEP_ALIVE_GRACE`` beyond KATO); once authenticated, the normal KATO applies again.
"""

from __future__ import annotations

import anyio
import pytest

from nvmeof.initiator.queue import QueuePair
from nvmeof.spec.auth import (
    Challenge,
    DhGroupId,
    HashId,
    Negotiate,
    Reply,
    Success1,
    auth_receive_command,
    auth_send_command,
    decode_message,
)
from nvmeof.spec.dhchap import host_response
from nvmeof.spec.fabrics import (
    CONNECT_AUTHREQ_ATR,
    ConnectData,
    connect_command,
    property_get_command,
)
from nvmeof.spec.properties import PropertyOffset
from nvmeof.transport.tcp import TcpHostChannel
from tests.integration.test_auth import (
    HOST_SECRET,
    HOSTID,
    HOSTNQN,
    auth_target,
    eventually,
    served,
)

pytestmark = pytest.mark.anyio

KATO_MS = 500


async def _receive(queue: QueuePair) -> object:
    buf = bytearray(4096)
    await queue.execute(auth_receive_command(len(buf)), into=[memoryview(buf)])
    return decode_message(buf)


async def _send(queue: QueuePair, payload: bytes) -> None:
    await queue.execute(auth_send_command(len(payload)), out=[payload])


async def test_keep_alive_timer_held_while_the_host_authenticates() -> None:
    async with served(auth_target(hashes=(HashId.SHA256,), dhgroups=(DhGroupId.NULL,))) as rt:
        assert rt.target is not None
        subsystem = rt.target.subsystems[rt.nqn]
        channel = await TcpHostChannel.connect(rt.host, rt.port)
        queue = QueuePair(channel, qid=0, depth=8)
        try:
            data = ConnectData(hostid=HOSTID, cntlid=0xFFFF, subnqn=rt.nqn, hostnqn=HOSTNQN)
            completion = await queue.execute(
                connect_command(qid=0, sqsize=7, kato_ms=KATO_MS), out=[data.pack()]
            )
            assert completion.dw0 & CONNECT_AUTHREQ_ATR
            cntlid = completion.dw0 & 0xFFFF
            await _send(queue, Negotiate(t_id=7, hashes=(1,), dhgroups=(0,)).pack())
            challenge = await _receive(queue)
            assert isinstance(challenge, Challenge)
            await anyio.sleep(4 * KATO_MS / 1000)  # the host "computes" past KATO
            assert cntlid in subsystem.controllers, "torn down while authenticating"
            r1 = host_response(
                HashId.SHA256, HOST_SECRET.transformed(HOSTNQN), challenge.challenge,
                seqnum=challenge.seqnum, t_id=7, hostnqn=HOSTNQN, subnqn=rt.nqn,
            )  # fmt: skip
            await _send(queue, Reply(t_id=7, response=r1, ctrl_challenge=None, seqnum=0).pack())
            assert isinstance(await _receive(queue), Success1)
            cap = await queue.execute(property_get_command(PropertyOffset.CAP, size=8))
            assert cap.status.success
            # authenticated: the host can send Keep Alive now, and KATO applies again
            await eventually(lambda: cntlid not in subsystem.controllers)
        finally:
            await queue.aclose()
