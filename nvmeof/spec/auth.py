"""In-band authentication (Authentication Send/Receive, fctype 0x05/0x06): DH-HMAC-CHAP messages.

Layouts as Linux ``include/linux/nvme.h`` (``struct nvmf_auth_dhchap_*``) and REFERENCE 3.3. Every
message starts with AUTH_TYPE, AUTH_ID, 2 reserved bytes and the host's transaction id (le16).
Decoding validates every length field before using it and raises ``AuthMessageError`` (carrying
the Failure reason explanation the peer should get) for anything malformed.
"""

from __future__ import annotations

import enum
import struct

import attrs

from nvmeof.spec.command import PSDT_SGL, AdminOpcode, Command
from nvmeof.spec.fabrics import FabricsCommandType
from nvmeof.spec.sgl import SglDescriptor

AUTH_SECP = 0xE9  # the NVMe in-band authentication security protocol
AUTH_SPSP0 = 0x01
AUTH_SPSP1 = 0x01
AUTHID_DHCHAP = 0x01
FAILURE_REASON_FAILED = 0x01  # the only REASON CODE: "authentication failure"
SC_C_NONE = 0  # no secure channel concatenation
MAX_AUTH_TRANSFER = 8192  # far above the largest message (ffdhe8192 Reply: 16 + 2*64 + 1024)
NEGOTIATE_DESCRIPTOR_SIZE = 64
_ID_LIST_HALF = 30  # a descriptor's 60-byte id list: 30 hash ids, then 30 DH group ids
HEADER_SIZE = 16  # Challenge / Reply / Success1 / Success2 fixed part
FAILURE_SIZE = 8


class AuthType(enum.IntEnum):
    COMMON = 0x00
    DHCHAP = 0x01


class AuthMessageId(enum.IntEnum):
    NEGOTIATE = 0x00
    CHALLENGE = 0x01
    REPLY = 0x02
    SUCCESS1 = 0x03
    SUCCESS2 = 0x04
    FAILURE2 = 0xF0
    FAILURE1 = 0xF1


class HashId(enum.IntEnum):
    SHA256 = 1
    SHA384 = 2
    SHA512 = 3

    @property
    def length(self) -> int:
        return {HashId.SHA256: 32, HashId.SHA384: 48, HashId.SHA512: 64}[self]

    @property
    def hashlib_name(self) -> str:
        return {HashId.SHA256: "sha256", HashId.SHA384: "sha384", HashId.SHA512: "sha512"}[self]


class DhGroupId(enum.IntEnum):
    NULL = 0
    FFDHE2048 = 1
    FFDHE3072 = 2
    FFDHE4096 = 3
    FFDHE6144 = 4
    FFDHE8192 = 5

    @property
    def bits(self) -> int:
        return {0: 0, 1: 2048, 2: 3072, 3: 4096, 4: 6144, 5: 8192}[int(self)]

    @property
    def value_length(self) -> int:
        """DHVLEN: public values travel big-endian, padded to the prime's size (kpp maxsize)."""
        return self.bits // 8


class FailureExplanation(enum.IntEnum):
    """REASON CODE EXPLANATION of Failure1/Failure2 (Linux NVME_AUTH_DHCHAP_FAILURE_*)."""

    FAILED = 0x01
    NOT_USABLE = 0x02
    CONCAT_MISMATCH = 0x03
    HASH_UNUSABLE = 0x04
    DHGROUP_UNUSABLE = 0x05
    INCORRECT_PAYLOAD = 0x06
    INCORRECT_PROTOCOL = 0x07


class AuthMessageError(ValueError):
    """A malformed authentication message; ``explanation`` is what the Failure message says."""

    def __init__(
        self, message: str, explanation: FailureExplanation = FailureExplanation.INCORRECT_PAYLOAD
    ) -> None:
        super().__init__(message)
        self.explanation = explanation


_PREFIX = struct.Struct("<BBxxH")  # auth type, auth id, reserved, T_ID
_DH_HEADER = struct.Struct("<BBxxHBxBBHI")  # + HL, rsvd, HASHID|CVALID, DHGID|rsvd, DHVLEN, SEQNUM


@attrs.frozen
class Negotiate:
    t_id: int
    hashes: tuple[int, ...]
    dhgroups: tuple[int, ...]
    sc_c: int = SC_C_NONE

    def pack(self) -> bytes:
        if len(self.hashes) > _ID_LIST_HALF or len(self.dhgroups) > _ID_LIST_HALF:
            raise ValueError("at most 30 hash and 30 DH group ids")
        buf = bytearray(8 + NEGOTIATE_DESCRIPTOR_SIZE)
        _PREFIX.pack_into(buf, 0, AuthType.COMMON, AuthMessageId.NEGOTIATE, self.t_id)
        buf[6] = self.sc_c
        buf[7] = 1  # NAPD
        desc = 8
        buf[desc] = AUTHID_DHCHAP
        buf[desc + 2] = len(self.hashes)
        buf[desc + 3] = len(self.dhgroups)
        buf[desc + 4 : desc + 4 + len(self.hashes)] = bytes(self.hashes)
        start = desc + 4 + _ID_LIST_HALF
        buf[start : start + len(self.dhgroups)] = bytes(self.dhgroups)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes) -> Negotiate:
        t_id = _check_prefix(buf, AuthType.COMMON, AuthMessageId.NEGOTIATE, 8)
        sc_c, napd = buf[6], buf[7]
        if napd < 1:
            raise AuthMessageError("negotiate carries no protocol descriptor")
        if len(buf) < 8 + napd * NEGOTIATE_DESCRIPTOR_SIZE:
            raise AuthMessageError(f"negotiate of {len(buf)} bytes is shorter than {napd} descr.")
        desc = buf[8 : 8 + NEGOTIATE_DESCRIPTOR_SIZE]
        if desc[0] != AUTHID_DHCHAP:
            raise AuthMessageError(
                f"protocol descriptor {desc[0]} is not DH-HMAC-CHAP", FailureExplanation.NOT_USABLE
            )
        halen, dhlen = desc[2], desc[3]
        if halen > _ID_LIST_HALF or dhlen > _ID_LIST_HALF:
            raise AuthMessageError(f"HALEN {halen} / DHLEN {dhlen} exceed 30")
        hashes = tuple(desc[4 : 4 + halen])
        start = 4 + _ID_LIST_HALF
        dhgroups = tuple(desc[start : start + dhlen])
        return cls(t_id=t_id, hashes=hashes, dhgroups=dhgroups, sc_c=sc_c)


@attrs.frozen
class Challenge:
    t_id: int
    hash_id: int
    dhgroup_id: int
    seqnum: int
    challenge: bytes
    dh_value: bytes = b""

    def pack(self) -> bytes:
        head = _DH_HEADER.pack(
            AuthType.DHCHAP, AuthMessageId.CHALLENGE, self.t_id, len(self.challenge),
            self.hash_id, self.dhgroup_id, len(self.dh_value), self.seqnum,
        )  # fmt: skip
        return head + self.challenge + self.dh_value

    @classmethod
    def unpack(cls, buf: bytes) -> Challenge:
        t_id = _check_prefix(buf, AuthType.DHCHAP, AuthMessageId.CHALLENGE, HEADER_SIZE)
        _, _, _, hl, hash_id, dhgid, dhvlen, seqnum = _DH_HEADER.unpack_from(buf)
        end = HEADER_SIZE + hl + dhvlen
        if hl == 0 or len(buf) < end:
            raise AuthMessageError(f"challenge HL {hl} DHVLEN {dhvlen} exceed {len(buf)} bytes")
        return cls(
            t_id=t_id, hash_id=hash_id, dhgroup_id=dhgid, seqnum=seqnum,
            challenge=bytes(buf[HEADER_SIZE : HEADER_SIZE + hl]),
            dh_value=bytes(buf[HEADER_SIZE + hl : end]),
        )  # fmt: skip


@attrs.frozen
class Reply:
    t_id: int
    response: bytes  # R1
    ctrl_challenge: bytes | None  # C2, when the host wants bidirectional authentication
    seqnum: int  # S2 (0 unless bidirectional)
    dh_value: bytes = b""

    def pack(self) -> bytes:
        hl = len(self.response)
        c2 = self.ctrl_challenge if self.ctrl_challenge is not None else bytes(hl)
        if len(c2) != hl:
            raise ValueError("C2 must be as long as R1")
        head = _DH_HEADER.pack(
            AuthType.DHCHAP, AuthMessageId.REPLY, self.t_id, hl,
            1 if self.ctrl_challenge is not None else 0, 0, len(self.dh_value), self.seqnum,
        )  # fmt: skip
        return head + self.response + c2 + self.dh_value

    @classmethod
    def unpack(cls, buf: bytes) -> Reply:
        t_id = _check_prefix(buf, AuthType.DHCHAP, AuthMessageId.REPLY, HEADER_SIZE)
        _, _, _, hl, cvalid, _, dhvlen, seqnum = _DH_HEADER.unpack_from(buf)
        end = HEADER_SIZE + 2 * hl + dhvlen
        if hl == 0 or len(buf) < end:
            raise AuthMessageError(f"reply HL {hl} DHVLEN {dhvlen} exceed {len(buf)} bytes")
        r1 = bytes(buf[HEADER_SIZE : HEADER_SIZE + hl])
        c2 = bytes(buf[HEADER_SIZE + hl : HEADER_SIZE + 2 * hl])
        return cls(
            t_id=t_id, response=r1, ctrl_challenge=c2 if cvalid else None, seqnum=seqnum,
            dh_value=bytes(buf[HEADER_SIZE + 2 * hl : end]),
        )  # fmt: skip


@attrs.frozen
class Success1:
    t_id: int
    hash_length: int
    response: bytes | None = None  # R2, when the host asked for bidirectional authentication

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE + self.hash_length)
        _PREFIX.pack_into(buf, 0, AuthType.DHCHAP, AuthMessageId.SUCCESS1, self.t_id)
        buf[6] = self.hash_length
        if self.response is not None:
            if len(self.response) != self.hash_length:
                raise ValueError("R2 must be HL bytes")
            buf[8] = 1  # RVALID
            buf[HEADER_SIZE:] = self.response
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes) -> Success1:
        t_id = _check_prefix(buf, AuthType.DHCHAP, AuthMessageId.SUCCESS1, HEADER_SIZE)
        hl, rvalid = buf[6], buf[8]
        if rvalid and len(buf) < HEADER_SIZE + hl:
            raise AuthMessageError(f"success1 HL {hl} exceeds {len(buf)} bytes")
        response = bytes(buf[HEADER_SIZE : HEADER_SIZE + hl]) if rvalid else None
        return cls(t_id=t_id, hash_length=hl, response=response)


@attrs.frozen
class Success2:
    t_id: int

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        _PREFIX.pack_into(buf, 0, AuthType.DHCHAP, AuthMessageId.SUCCESS2, self.t_id)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes) -> Success2:
        return cls(t_id=_check_prefix(buf, AuthType.DHCHAP, AuthMessageId.SUCCESS2, HEADER_SIZE))


@attrs.frozen
class Failure:
    """Failure1 (controller to host, ``from_host`` False) or Failure2 (host to controller)."""

    t_id: int
    explanation: int
    from_host: bool = False
    reason: int = FAILURE_REASON_FAILED

    def pack(self) -> bytes:
        msg = AuthMessageId.FAILURE2 if self.from_host else AuthMessageId.FAILURE1
        buf = bytearray(FAILURE_SIZE)
        _PREFIX.pack_into(buf, 0, AuthType.COMMON, msg, self.t_id)
        buf[6] = self.reason
        buf[7] = self.explanation
        return bytes(buf)


AuthMessage = Negotiate | Challenge | Reply | Success1 | Success2 | Failure


def decode_message(buf: bytes | bytearray | memoryview) -> AuthMessage:
    """Any authentication message; ``AuthMessageError`` if it is none or malformed."""
    data = bytes(buf)
    if len(data) < 6:
        raise AuthMessageError(f"authentication message of {len(data)} bytes")
    kind, ident = data[0], data[1]
    if kind == AuthType.COMMON:
        if ident == AuthMessageId.NEGOTIATE:
            return Negotiate.unpack(data)
        if ident in (AuthMessageId.FAILURE1, AuthMessageId.FAILURE2):
            t_id = _check_prefix(data, AuthType.COMMON, AuthMessageId(ident), FAILURE_SIZE)
            return Failure(
                t_id=t_id, reason=data[6], explanation=data[7],
                from_host=ident == AuthMessageId.FAILURE2,
            )  # fmt: skip
    elif kind == AuthType.DHCHAP:
        decoders = {
            AuthMessageId.CHALLENGE: Challenge.unpack,
            AuthMessageId.REPLY: Reply.unpack,
            AuthMessageId.SUCCESS1: Success1.unpack,
            AuthMessageId.SUCCESS2: Success2.unpack,
        }
        decoder = decoders.get(ident)  # type: ignore[call-overload]
        if decoder is not None:
            message: AuthMessage = decoder(data)
            return message
    raise AuthMessageError(
        f"unknown authentication message type {kind} id 0x{ident:02x}",
        FailureExplanation.INCORRECT_PROTOCOL,
    )


def _check_prefix(buf: bytes, kind: AuthType, ident: AuthMessageId, size: int) -> int:
    if len(buf) < size:
        raise AuthMessageError(f"{ident.name.lower()} of {len(buf)} bytes, at least {size} needed")
    got_kind, got_id, t_id = _PREFIX.unpack_from(buf)
    if got_kind != kind or got_id != ident:
        raise AuthMessageError(
            f"message {got_kind}/0x{got_id:02x} is not {ident.name.lower()}",
            FailureExplanation.INCORRECT_PROTOCOL,
        )
    return int(t_id)


# --- the SQEs ------------------------------------------------------------------------------------
def _auth_command(fctype: FabricsCommandType, length: int, cid: int) -> Command:
    return Command(
        opcode=AdminOpcode.FABRICS,
        cid=cid,
        nsid=int(fctype),
        flags=PSDT_SGL,
        dptr=SglDescriptor(),
        cdw10=AUTH_SPSP0 << 8 | AUTH_SPSP1 << 16 | AUTH_SECP << 24,
        cdw11=length & 0xFFFFFFFF,
    )


def auth_send_command(length: int, *, cid: int = 0) -> Command:
    """Authentication Send of ``length`` (TL) bytes; the transport fills the data pointer."""
    return _auth_command(FabricsCommandType.AUTHENTICATION_SEND, length, cid)


def auth_receive_command(length: int, *, cid: int = 0) -> Command:
    """Authentication Receive into at most ``length`` (AL) bytes."""
    return _auth_command(FabricsCommandType.AUTHENTICATION_RECEIVE, length, cid)


@attrs.frozen
class AuthCommandFields:
    """SQE bytes 41..47 of Authentication Send/Receive."""

    spsp0: int
    spsp1: int
    secp: int
    length: int  # TL (Send) or AL (Receive)

    @classmethod
    def from_command(cls, cmd: Command) -> AuthCommandFields:
        return cls(
            spsp0=(cmd.cdw10 >> 8) & 0xFF,
            spsp1=(cmd.cdw10 >> 16) & 0xFF,
            secp=(cmd.cdw10 >> 24) & 0xFF,
            length=cmd.cdw11,
        )

    @property
    def valid_protocol(self) -> bool:
        return (self.secp, self.spsp0, self.spsp1) == (AUTH_SECP, AUTH_SPSP0, AUTH_SPSP1)
