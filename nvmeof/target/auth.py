"""The controller side of DH-HMAC-CHAP on one queue (as Linux nvmet fabrics-cmd-auth.c / auth.c).

Sans-IO: ``on_send(data)`` takes an Authentication Send payload, ``on_receive(al)`` gives the
Authentication Receive payload. A protocol or verification failure never fails the command: it
moves the transaction to Failure1, which the next Receive returns (reason 1, with the explanation),
after which the queue is closed (``failed``). Until ``authenticated`` the queue serves nothing else.
"""

from __future__ import annotations

import enum
import logging
import secrets

import attrs

from nvmeof.spec.auth import (
    SC_C_NONE,
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

log = logging.getLogger("nvmeof.target.auth")

# SPDK's choice: the strongest digest and DH group both sides allow.
DEFAULT_HASHES = (HashId.SHA512, HashId.SHA384, HashId.SHA256)
DEFAULT_DHGROUPS = (
    DhGroupId.FFDHE8192,
    DhGroupId.FFDHE6144,
    DhGroupId.FFDHE4096,
    DhGroupId.FFDHE3072,
    DhGroupId.FFDHE2048,
    DhGroupId.NULL,
)


@attrs.frozen
class HostAuthConfig:
    """What a subsystem requires of one host: its secret, optionally the controller's secret
    (bidirectional), and the digests / DH groups allowed, in the controller's preference order."""

    host_key: DhchapSecret
    ctrl_key: DhchapSecret | None = None
    hashes: tuple[HashId, ...] = DEFAULT_HASHES
    dhgroups: tuple[DhGroupId, ...] = DEFAULT_DHGROUPS


class AuthStep(enum.Enum):
    NEGOTIATE = "negotiate"  # waiting for the host's Negotiate (Send)
    CHALLENGE = "challenge"  # our Challenge is due (Receive)
    REPLY = "reply"  # waiting for the host's Reply (Send)
    SUCCESS1 = "success1"  # our Success1 is due (Receive)
    SUCCESS2 = "success2"  # waiting for the host's Success2 (Send)
    FAILURE1 = "failure1"  # our Failure1 is due (Receive)
    DONE = "done"
    FAILED = "failed"


class AllocationTooSmall(ValueError):
    """The Receive's allocation length cannot hold the message (nvmet: Invalid Field)."""


class ControllerAuthentication:
    """One queue's authentication transaction(s)."""

    def __init__(self, config: HostAuthConfig, *, hostnqn: str, subnqn: str) -> None:
        self.config = config
        self.hostnqn = hostnqn
        self.subnqn = subnqn
        self.step = AuthStep.NEGOTIATE
        self.authenticated = False
        self.failure: FailureExplanation | None = None
        self._t_id = 0
        self._hash = HashId.SHA256
        self._dhgroup = DhGroupId.NULL
        self._seqnum = 0
        self._c1 = b""
        self._dh: DhKeyPair | None = None
        self._response: bytes | None = None

    @property
    def failed(self) -> bool:
        """The transaction failed and Failure1 went out (or the host sent Failure2): close."""
        return self.step is AuthStep.FAILED

    # --- Authentication Send -------------------------------------------------------------------
    def on_send(self, data: bytes) -> None:
        try:
            message = decode_message(data)
        except AuthMessageError as exc:
            self._fail(exc.explanation, str(exc))
            return
        if isinstance(message, Negotiate):  # starts (or restarts: re-authentication) a transaction
            self._negotiate(message)
            return
        if isinstance(message, Failure) and message.from_host:
            log.warning(
                "host %s aborted authentication to %s (Failure2, explanation %d)",
                self.hostnqn, self.subnqn, message.explanation,
            )  # fmt: skip
            self.step = AuthStep.FAILED
            self.authenticated = False
            return
        expected = (isinstance(message, Reply) and self.step is AuthStep.REPLY) or (
            isinstance(message, Success2) and self.step is AuthStep.SUCCESS2
        )
        if not expected:
            self._fail(
                FailureExplanation.INCORRECT_PROTOCOL,
                f"{type(message).__name__} in step {self.step.value}",
            )
        elif message.t_id != self._t_id:
            self._fail(FailureExplanation.INCORRECT_PAYLOAD, f"T_ID {message.t_id} != {self._t_id}")
        elif isinstance(message, Reply):
            self._reply(message)
        else:
            self._succeed()

    def _negotiate(self, msg: Negotiate) -> None:
        self._t_id = msg.t_id
        self._dh = None
        if msg.sc_c != SC_C_NONE:
            self._fail(FailureExplanation.CONCAT_MISMATCH, "secure channel concatenation asked")
            return
        hash_id = next((h for h in self.config.hashes if h in msg.hashes), None)
        if hash_id is None:
            self._fail(FailureExplanation.HASH_UNUSABLE, f"no common hash in {msg.hashes}")
            return
        group = next((g for g in self.config.dhgroups if g in msg.dhgroups), None)
        if group is None:
            self._fail(FailureExplanation.DHGROUP_UNUSABLE, f"no common group in {msg.dhgroups}")
            return
        self._hash, self._dhgroup = hash_id, group
        self.step = AuthStep.CHALLENGE

    def _reply(self, msg: Reply) -> None:
        hl = self._hash.length
        if len(msg.response) != hl:
            self._fail(FailureExplanation.INCORRECT_PAYLOAD, f"HL {len(msg.response)} != {hl}")
            return
        c1 = self._c1
        if self._dh is not None:
            try:
                session_key = self._dh.shared_secret(msg.dh_value)
            except DhValueError as exc:
                self._fail(FailureExplanation.INCORRECT_PAYLOAD, str(exc))
                return
            c1 = augmented_challenge(self._hash, session_key, self._c1)
        elif msg.dh_value:
            self._fail(FailureExplanation.INCORRECT_PAYLOAD, "DH value with the NULL group")
            return
        else:
            session_key = b""
        expected = host_response(
            self._hash, self.config.host_key.transformed(self.hostnqn), c1,
            seqnum=self._seqnum, t_id=self._t_id, hostnqn=self.hostnqn, subnqn=self.subnqn,
        )  # fmt: skip
        if not responses_equal(expected, msg.response):
            self._fail(FailureExplanation.FAILED, "host response does not match (wrong secret)")
            return
        self._response = None
        if msg.ctrl_challenge is not None:
            if self.config.ctrl_key is None:
                # nvmet: the host asks for bidirectional authentication we hold no key for.
                self._fail(FailureExplanation.FAILED, "bidirectional asked, no controller key")
                return
            c2 = msg.ctrl_challenge
            if self._dh is not None:
                c2 = augmented_challenge(self._hash, session_key, c2)
            self._response = controller_response(
                self._hash, self.config.ctrl_key.transformed(self.subnqn), c2,
                seqnum=msg.seqnum, t_id=self._t_id, hostnqn=self.hostnqn, subnqn=self.subnqn,
            )  # fmt: skip
        self.step = AuthStep.SUCCESS1

    # --- Authentication Receive ----------------------------------------------------------------
    def on_receive(self, allocation_length: int) -> bytes:
        if self.step is AuthStep.CHALLENGE:
            message = self._challenge()
        elif self.step is AuthStep.SUCCESS1:
            message = Success1(
                t_id=self._t_id, hash_length=self._hash.length, response=self._response
            ).pack()
        elif self.step is AuthStep.FAILURE1:
            message = self._failure1()
        else:
            self._fail(FailureExplanation.INCORRECT_PROTOCOL, f"receive in step {self.step.value}")
            message = self._failure1()
        if allocation_length < len(message):
            if self.step is AuthStep.FAILED:
                return message[:allocation_length]
            raise AllocationTooSmall(f"AL {allocation_length} < {len(message)}")
        if self.step is AuthStep.CHALLENGE:
            self.step = AuthStep.REPLY
        elif self.step is AuthStep.SUCCESS1:
            if self._response is not None:
                self.step = AuthStep.SUCCESS2
            else:
                self._succeed()
        return message

    def _challenge(self) -> bytes:
        self._seqnum = new_seqnum()
        self._c1 = secrets.token_bytes(self._hash.length)
        dh_value = b""
        if self._dhgroup is not DhGroupId.NULL:
            self._dh = DhKeyPair(self._dhgroup)
            dh_value = self._dh.public_value
        return Challenge(
            t_id=self._t_id, hash_id=self._hash, dhgroup_id=self._dhgroup,
            seqnum=self._seqnum, challenge=self._c1, dh_value=dh_value,
        ).pack()  # fmt: skip

    def _failure1(self) -> bytes:
        explanation = self.failure or FailureExplanation.FAILED
        self.step = AuthStep.FAILED
        self.authenticated = False
        return Failure(t_id=self._t_id, explanation=explanation).pack()

    def _succeed(self) -> None:
        self.step = AuthStep.DONE
        self.authenticated = True
        self._dh = None
        log.debug("host %s authenticated to %s (%s, %s)", self.hostnqn, self.subnqn,
                  self._hash.name, self._dhgroup.name)  # fmt: skip

    def _fail(self, explanation: FailureExplanation, why: str) -> None:
        log.warning("authentication of %s to %s failed: %s", self.hostnqn, self.subnqn, why)
        self.failure = explanation
        self.step = AuthStep.FAILURE1
        self.authenticated = False
        self._dh = None
