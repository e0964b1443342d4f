"""The host side of DH-HMAC-CHAP on one queue (as Linux drivers/nvme/host/auth.c).

Negotiate -> Challenge -> Reply -> Success1 [-> Success2 when bidirectional]. The controller's
Failure1 raises ``AuthenticationFailed`` with its explanation; a controller that fails our checks
(unknown hash or group, wrong R2) gets a Failure2 first.
"""

from __future__ import annotations

import logging
import secrets
from typing import Never, TypeVar

import attrs

from nvmeof.errors import AuthenticationFailed
from nvmeof.initiator.queue import QueuePair
from nvmeof.spec.auth import (
    AuthMessage,
    AuthMessageError,
    Challenge,
    DhGroupId,
    Failure,
    FailureExplanation,
    HashId,
    Negotiate,
    Reply,
    Success1,
    Success2,
    auth_receive_command,
    auth_send_command,
    decode_message,
)
from nvmeof.spec.dhchap import (
    DhchapSecret,
    DhKeyPair,
    DhValueError,
    augmented_challenge,
    controller_response,
    host_response,
    new_seqnum,
    responses_equal,
)

log = logging.getLogger("nvmeof.initiator.auth")
_M = TypeVar("_M", Challenge, Success1)

RECEIVE_BUFFER = 4096  # Linux CHAP_BUF_SIZE
ALL_HASHES = (HashId.SHA256, HashId.SHA384, HashId.SHA512)
ALL_DHGROUPS = tuple(DhGroupId)


@attrs.frozen
class DhchapOptions:
    """The host's secret, optionally the controller's (bidirectional), and what it offers."""

    secret: DhchapSecret
    ctrl_secret: DhchapSecret | None = None
    hashes: tuple[HashId, ...] = ALL_HASHES
    dhgroups: tuple[DhGroupId, ...] = ALL_DHGROUPS


class _Abort(Exception):
    def __init__(self, explanation: FailureExplanation, message: str) -> None:
        super().__init__(message)
        self.explanation = explanation


async def authenticate(
    queue: QueuePair,
    options: DhchapOptions,
    *,
    hostnqn: str,
    subnqn: str,
    timeout: float | None = None,
) -> None:
    """Run one DH-HMAC-CHAP transaction on ``queue`` (just connected, ATR set)."""
    t_id = secrets.randbits(16)
    session = _HostTransaction(queue, t_id, timeout)
    await session.send(Negotiate(t_id=t_id, hashes=options.hashes, dhgroups=options.dhgroups))
    challenge = await session.receive(Challenge)
    try:
        hash_id, group = _check_challenge(challenge, options, t_id)
        c1 = challenge.challenge
        dh_value = b""
        session_key = b""
        if group is not DhGroupId.NULL:
            pair = DhKeyPair(group)
            try:
                session_key = pair.shared_secret(challenge.dh_value)
            except DhValueError as exc:
                raise _Abort(FailureExplanation.INCORRECT_PAYLOAD, str(exc)) from exc
            dh_value = pair.public_value
            c1 = augmented_challenge(hash_id, session_key, c1)
    except _Abort as exc:
        await session.fail(exc.explanation, str(exc))
    r1 = host_response(
        hash_id, options.secret.transformed(hostnqn), c1,
        seqnum=challenge.seqnum, t_id=t_id, hostnqn=hostnqn, subnqn=subnqn,
    )  # fmt: skip
    c2: bytes | None = None
    s2 = 0
    if options.ctrl_secret is not None:
        c2 = secrets.token_bytes(hash_id.length)
        s2 = new_seqnum()
    await session.send(
        Reply(t_id=t_id, response=r1, ctrl_challenge=c2, seqnum=s2, dh_value=dh_value)
    )
    success = await session.receive(Success1)
    if options.ctrl_secret is None or c2 is None:
        _authenticated(queue, hash_id, group, bidirectional=False)
        return
    if group is not DhGroupId.NULL:
        c2 = augmented_challenge(hash_id, session_key, c2)
    expected = controller_response(
        hash_id, options.ctrl_secret.transformed(subnqn), c2,
        seqnum=s2, t_id=t_id, hostnqn=hostnqn, subnqn=subnqn,
    )  # fmt: skip
    if success.response is None or not responses_equal(expected, success.response):
        await session.fail(FailureExplanation.FAILED, "controller response does not match")
    await session.send(Success2(t_id=t_id))
    _authenticated(queue, hash_id, group, bidirectional=True)


def _authenticated(
    queue: QueuePair, hash_id: HashId, group: DhGroupId, *, bidirectional: bool
) -> None:
    log.debug(
        "[%d/%d] authenticated (%s, %s)%s", queue.cntlid, queue.qid, hash_id.name, group.name,
        ", bidirectional" if bidirectional else "",
    )  # fmt: skip


def _check_challenge(
    challenge: Challenge, options: DhchapOptions, t_id: int
) -> tuple[HashId, DhGroupId]:
    if challenge.t_id != t_id:
        raise _Abort(FailureExplanation.INCORRECT_PAYLOAD, f"T_ID {challenge.t_id} != {t_id}")
    if challenge.hash_id not in options.hashes:
        raise _Abort(FailureExplanation.HASH_UNUSABLE, f"hash {challenge.hash_id} not offered")
    if challenge.dhgroup_id not in options.dhgroups:
        raise _Abort(
            FailureExplanation.DHGROUP_UNUSABLE, f"DH group {challenge.dhgroup_id} not offered"
        )
    hash_id, group = HashId(challenge.hash_id), DhGroupId(challenge.dhgroup_id)
    if len(challenge.challenge) != hash_id.length:
        raise _Abort(FailureExplanation.INCORRECT_PAYLOAD, f"HL {len(challenge.challenge)}")
    if group is DhGroupId.NULL and challenge.dh_value:
        raise _Abort(FailureExplanation.INCORRECT_PAYLOAD, "DH value with the NULL group")
    return hash_id, group


class _HostTransaction:
    def __init__(self, queue: QueuePair, t_id: int, timeout: float | None) -> None:
        self.queue = queue
        self.t_id = t_id
        self.timeout = timeout

    async def send(self, message: Negotiate | Reply | Success2 | Failure) -> None:
        payload = message.pack()
        await self.queue.execute(
            auth_send_command(len(payload)), out=[payload], timeout=self.timeout
        )

    async def receive(self, expected: type[_M]) -> _M:
        buf = bytearray(RECEIVE_BUFFER)
        await self.queue.execute(
            auth_receive_command(len(buf)), into=[memoryview(buf)], timeout=self.timeout
        )
        try:
            message: AuthMessage = decode_message(buf)
        except AuthMessageError as exc:
            await self.fail(exc.explanation, f"bad message from the controller: {exc}")
        if isinstance(message, Failure) and not message.from_host:
            raise AuthenticationFailed(
                f"controller refused authentication (Failure1, reason {message.reason},"
                f" explanation {message.explanation}"
                f" {_explain(message.explanation)})",
                message.explanation,
            )
        if not isinstance(message, expected):
            await self.fail(
                FailureExplanation.INCORRECT_PROTOCOL,
                f"expected {expected.__name__}, got {type(message).__name__}",
            )
        return message

    async def fail(self, explanation: FailureExplanation, why: str) -> Never:
        log.warning("[%d/%d] authentication failed: %s", self.queue.cntlid, self.queue.qid, why)
        try:
            await self.send(Failure(t_id=self.t_id, explanation=explanation, from_host=True))
        finally:
            raise AuthenticationFailed(why, explanation)


def _explain(explanation: int) -> str:
    try:
        return f"({FailureExplanation(explanation).name.lower()})"
    except ValueError:
        return ""
