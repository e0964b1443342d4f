"""DH-HMAC-CHAP between our initiator and our target over loopback, and host access control.

Each test serves a KV target whose subsystem lists the host with its secret (and optionally the
controller's); the initiator authenticates every queue (admin and I/O) after Connect (ATR set).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable

import anyio
import attrs
import pytest

from kvext.client import KVClient
from nvmeof.errors import AuthenticationFailed, ConnectionLost, NvmeError
from nvmeof.initiator.controller import ConnectOptions, Controller
from nvmeof.initiator.queue import QueuePair
from nvmeof.spec.auth import (
    DhGroupId,
    Failure,
    FailureExplanation,
    HashId,
    Negotiate,
    auth_receive_command,
    auth_send_command,
    decode_message,
)
from nvmeof.spec.dhchap import DhchapSecret
from nvmeof.spec.fabrics import (
    CONNECT_AUTHREQ_ATR,
    ConnectData,
    connect_command,
    property_get_command,
)
from nvmeof.spec.properties import PropertyOffset
from nvmeof.spec.status import FabricsStatus, StatusCodeType
from nvmeof.target.auth import HostAuthConfig
from nvmeof.target.subsystem import Target
from nvmeof.testing import RunningTarget, make_kv_target, serve_target
from nvmeof.transport.tcp import TcpHostChannel

pytestmark = pytest.mark.anyio

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0c1e3f5a-8d21-4b7e-9f0a-2a3b4c5d6e7f"
OTHER_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
HOSTID = bytes(range(16))
TIMEOUT = 20.0

HOST_SECRET = DhchapSecret.generate(32, transform=1)
CTRL_SECRET = DhchapSecret.generate(48, transform=2)


def auth_target(
    *,
    ctrl_key: DhchapSecret | None = None,
    hashes: tuple[HashId, ...] | None = None,
    dhgroups: tuple[DhGroupId, ...] | None = None,
) -> Target:
    target = make_kv_target(hosts=[HOSTNQN], capacity=16 << 20)
    subsystem = next(iter(target.subsystems.values()))
    config = HostAuthConfig(host_key=HOST_SECRET, ctrl_key=ctrl_key)
    if hashes is not None:
        config = HostAuthConfig(host_key=HOST_SECRET, ctrl_key=ctrl_key, hashes=hashes)
    if dhgroups is not None:
        config = HostAuthConfig(
            host_key=HOST_SECRET, ctrl_key=ctrl_key, hashes=config.hashes, dhgroups=dhgroups
        )
    subsystem.host_auth[HOSTNQN] = config
    return target


@contextlib.asynccontextmanager
async def served(target: Target) -> AsyncIterator[RunningTarget]:
    with anyio.fail_after(TIMEOUT):
        async with serve_target(target) as rt:
            yield rt


async def roundtrip(rt: RunningTarget, **options: object) -> None:
    async with KVClient.connect(
        rt.address, rt.nqn, hostnqn=HOSTNQN, hostid=HOSTID, io_queues=2, timeout=10.0, **options
    ) as client:
        await client.put(b"k", b"authenticated value")
        assert await client.get(b"k") == b"authenticated value"


@pytest.mark.parametrize("hash_id", list(HashId))
@pytest.mark.parametrize("group", [DhGroupId.NULL, DhGroupId.FFDHE2048, DhGroupId.FFDHE3072])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
async def test_authenticated_roundtrip(
    hash_id: HashId, group: DhGroupId, bidirectional: bool
) -> None:
    ctrl = CTRL_SECRET if bidirectional else None
    async with served(auth_target(ctrl_key=ctrl)) as rt:
        await roundtrip(
            rt,
            dhchap_secret=str(HOST_SECRET),
            dhchap_ctrl_secret=None if ctrl is None else str(ctrl),
            dhchap_hashes=[hash_id],
            dhchap_dhgroups=[group],
        )


async def test_larger_groups_and_default_negotiation() -> None:
    """With everything offered the target picks the strongest (SPDK's choice): ffdhe8192."""
    async with served(auth_target(ctrl_key=CTRL_SECRET)) as rt:
        await roundtrip(rt, dhchap_secret=HOST_SECRET, dhchap_ctrl_secret=CTRL_SECRET)
        for group in (DhGroupId.FFDHE4096, DhGroupId.FFDHE6144):
            await roundtrip(rt, dhchap_secret=HOST_SECRET, dhchap_dhgroups=[group])


async def test_untransformed_secret() -> None:
    secret = DhchapSecret.generate(64, transform=0)
    target = make_kv_target(hosts=[HOSTNQN])
    next(iter(target.subsystems.values())).host_auth[HOSTNQN] = HostAuthConfig(host_key=secret)
    async with served(target) as rt:
        await roundtrip(rt, dhchap_secret=str(secret), dhchap_dhgroups=[DhGroupId.FFDHE2048])


@pytest.mark.parametrize("group", [DhGroupId.NULL, DhGroupId.FFDHE2048])
async def test_wrong_secret_refused_with_failure1(
    group: DhGroupId, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with served(auth_target()) as rt:
        with pytest.raises(AuthenticationFailed) as info:
            await roundtrip(rt, dhchap_secret=DhchapSecret.generate(), dhchap_dhgroups=[group])
        assert info.value.explanation == FailureExplanation.FAILED
        assert "wrong secret" in caplog.text
        # nothing of that host stays behind, and the right secret still works
        assert rt.target is not None
        subsystem = rt.target.subsystems[rt.nqn]
        await eventually(lambda: not subsystem.controllers)
        await roundtrip(rt, dhchap_secret=HOST_SECRET, dhchap_dhgroups=[group])


async def test_wrong_controller_secret_detected_by_host() -> None:
    async with served(auth_target(ctrl_key=CTRL_SECRET)) as rt:
        with pytest.raises(AuthenticationFailed, match="controller response"):
            await roundtrip(
                rt,
                dhchap_secret=HOST_SECRET,
                dhchap_ctrl_secret=DhchapSecret.generate(48, transform=2),
                dhchap_dhgroups=[DhGroupId.NULL],
            )


async def test_bidirectional_asked_but_target_has_no_controller_key() -> None:
    async with served(auth_target()) as rt:
        with pytest.raises(AuthenticationFailed) as info:
            await roundtrip(rt, dhchap_secret=HOST_SECRET, dhchap_ctrl_secret=CTRL_SECRET)
        assert info.value.explanation == FailureExplanation.FAILED


async def test_bidirectional_refuses_target_that_does_not_authenticate() -> None:
    async with served(make_kv_target()) as rt:
        with pytest.raises(AuthenticationFailed, match="did not ask"):
            await roundtrip(rt, dhchap_secret=HOST_SECRET, dhchap_ctrl_secret=CTRL_SECRET)


async def test_no_common_hash_or_group() -> None:
    async with served(auth_target(hashes=(HashId.SHA512,), dhgroups=(DhGroupId.NULL,))) as rt:
        with pytest.raises(AuthenticationFailed) as info:
            await roundtrip(rt, dhchap_secret=HOST_SECRET, dhchap_hashes=[HashId.SHA256])
        assert info.value.explanation == FailureExplanation.HASH_UNUSABLE
        with pytest.raises(AuthenticationFailed) as info:
            await roundtrip(rt, dhchap_secret=HOST_SECRET, dhchap_dhgroups=[DhGroupId.FFDHE2048])
        assert info.value.explanation == FailureExplanation.DHGROUP_UNUSABLE


async def test_connect_without_secret_refused() -> None:
    async with served(auth_target()) as rt:
        with pytest.raises(AuthenticationFailed, match="requires authentication"):
            await roundtrip(rt)


async def eventually(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        for _ in itertools.count():
            if predicate():
                return
            await anyio.sleep(0.01)


async def refused_until_closed(queue: QueuePair) -> None:
    for _ in range(100):
        completion = await queue.execute(
            property_get_command(PropertyOffset.CAP, size=8), check=False
        )
        assert completion.status.sc == FabricsStatus.AUTHENTICATION_REQUIRED
        await anyio.sleep(0.1)


async def _raw_admin(rt: RunningTarget) -> tuple[QueuePair, int]:
    channel = await TcpHostChannel.connect(rt.host, rt.port)
    queue = QueuePair(channel, qid=0, depth=8)
    data = ConnectData(hostid=HOSTID, cntlid=0xFFFF, subnqn=rt.nqn, hostnqn=HOSTNQN)
    completion = await queue.execute(connect_command(qid=0, sqsize=7), out=[data.pack()])
    return queue, completion.dw0


async def test_unauthenticated_queue_serves_nothing_else() -> None:
    """Connect succeeds with ATR set; anything but Authentication Send/Receive then gets
    Authentication Required (SCT 1 / 0x91), as Linux nvmet."""
    async with served(auth_target()) as rt:
        queue, dw0 = await _raw_admin(rt)
        try:
            assert dw0 & CONNECT_AUTHREQ_ATR
            completion = await queue.execute(
                property_get_command(PropertyOffset.CAP, size=8), check=False
            )
            assert completion.status.sct == StatusCodeType.COMMAND_SPECIFIC
            assert completion.status.sc == FabricsStatus.AUTHENTICATION_REQUIRED
            assert completion.status.dnr
        finally:
            await queue.aclose()


async def test_protocol_violation_gets_failure1_and_queue_closed() -> None:
    """A Reply before Negotiate: the next Receive carries Failure1 (incorrect protocol), and the
    target then closes the queue."""
    async with served(auth_target()) as rt:
        queue, _ = await _raw_admin(rt)
        try:
            success2 = bytes([1, 4, 0, 0, 7, 0]) + bytes(10)
            await queue.execute(auth_send_command(len(success2)), out=[success2])
            buf = bytearray(4096)
            await queue.execute(auth_receive_command(len(buf)), into=[memoryview(buf)])
            message = decode_message(buf)
            assert isinstance(message, Failure)
            assert not message.from_host
            assert message.reason == 1
            assert message.explanation == FailureExplanation.INCORRECT_PROTOCOL
            with pytest.raises(ConnectionLost):  # refused until the target hangs up
                await refused_until_closed(queue)
        finally:
            await queue.aclose()


async def test_bad_secp_is_invalid_field() -> None:
    async with served(auth_target()) as rt:
        queue, _ = await _raw_admin(rt)
        try:
            negotiate = Negotiate(t_id=1, hashes=(1,), dhgroups=(0,)).pack()
            cmd = auth_send_command(len(negotiate))
            bad = attrs.evolve(cmd, cdw10=cmd.cdw10 & 0x00FFFFFF)
            completion = await queue.execute(bad, out=[negotiate], check=False)
            assert completion.status.sct == StatusCodeType.GENERIC
            assert completion.status.sc == 0x02
        finally:
            await queue.aclose()


async def test_io_queue_must_authenticate_too() -> None:
    """Knowing the CNTLID of an authenticated controller is not enough to attach an I/O queue."""
    async with served(auth_target()) as rt, Controller.connect(
        rt.address, rt.nqn, hostnqn=HOSTNQN, hostid=HOSTID, dhchap_secret=HOST_SECRET,
        dhchap_dhgroups=[DhGroupId.NULL], io_queues=1,
    ) as ctrl:  # fmt: skip
        options = ConnectOptions(
            host=rt.host, port=rt.port, subnqn=rt.nqn, hostnqn=HOSTNQN, hostid=HOSTID,
            io_queues=2, queue_depth=8, kato_ms=0, header_digest=False,
            data_digest=False, timeout=5.0,
        )  # fmt: skip
        await ctrl.io_queues[0].aclose()  # free QID 1 for a queue without a secret
        controller = rt.target.subsystems[rt.nqn].controllers[ctrl.cntlid]  # type: ignore[union-attr]
        await eventually(lambda: not controller.io_queues)
        with pytest.raises(AuthenticationFailed, match="requires authentication"):
            await Controller._connect_queue(options, qid=1, depth=8, cntlid=ctrl.cntlid)
        ctrl.io_queues.clear()


# --- host access control ------------------------------------------------------------------------
async def test_host_not_allowed_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with served(make_kv_target(hosts=[HOSTNQN])) as rt:
        with pytest.raises(NvmeError) as info:
            await _connect_as(rt, OTHER_HOSTNQN)
        assert info.value.status.sct == StatusCodeType.COMMAND_SPECIFIC
        assert info.value.status.sc == FabricsStatus.CONNECT_INVALID_HOST
        assert OTHER_HOSTNQN in caplog.text
        assert "127.0.0.1" in caplog.text  # the peer address
        await _connect_as(rt, HOSTNQN)


async def _connect_as(rt: RunningTarget, hostnqn: str) -> None:
    async with Controller.connect(rt.address, rt.nqn, hostnqn=hostnqn, timeout=5.0):
        pass
