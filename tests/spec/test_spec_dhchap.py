"""DH-HMAC-CHAP: secrets, the transformed key, R1/R2, the augmented challenge, messages, FFDHE.

Every computation is checked against a second implementation written here from REFERENCE 3.3 with
hashlib/hmac on concatenated byte strings (the library feeds HMAC piecewise), and pinned as a
known-answer vector so a change in either shows. The FFDHE primes are rebuilt from the RFC 7919
formula, independently of the OpenSSL export in nvmeof/spec/ffdhe.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmeof.spec import ffdhe
from nvmeof.spec.auth import (
    AuthCommandFields,
    AuthMessageError,
    Challenge,
    DhGroupId,
    Failure,
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
    SecretFormatError,
    augmented_challenge,
    controller_response,
    host_response,
)

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0c1e3f5a-8d21-4b7e-9f0a-2a3b4c5d6e7f"
SUBNQN = "nqn.2024-01.io.gpucache:test"
KEY = bytes(range(32))
CHALLENGE = bytes(range(0x40, 0x60))
SEQNUM = 0x12345678
T_ID = 0xBEEF


def independent_secret(key: bytes, hh: int) -> str:
    crc = (zlib.crc32(key) & 0xFFFFFFFF).to_bytes(4, "little")
    return f"DHHC-1:{hh:02d}:{base64.b64encode(key + crc).decode()}:"


def independent_transform(key: bytes, hh: int, nqn: str) -> bytes:
    if hh == 0:
        return key
    name = {1: "sha256", 2: "sha384", 3: "sha512"}[hh]
    return hmac.new(key, nqn.encode() + b"NVMe-over-Fabrics", name).digest()


def independent_r1(name: str, key: bytes, c: bytes, s1: int, t_id: int, sc_c: int = 0) -> bytes:
    msg = (
        c + s1.to_bytes(4, "little") + t_id.to_bytes(2, "little") + bytes([sc_c]) + b"HostHost"
        + HOSTNQN.encode() + b"\x00" + SUBNQN.encode()
    )  # fmt: skip
    return hmac.new(key, msg, name).digest()


def independent_r2(name: str, key: bytes, c: bytes, s2: int, t_id: int) -> bytes:
    msg = (
        c + s2.to_bytes(4, "little") + t_id.to_bytes(2, "little") + b"\x00" + b"Controller"
        + SUBNQN.encode() + b"\x00" + HOSTNQN.encode()
    )  # fmt: skip
    return hmac.new(key, msg, name).digest()


# --- secrets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hh", [0, 1, 2, 3])
@pytest.mark.parametrize("length", [32, 48, 64])
def test_secret_representation_roundtrip(hh: int, length: int) -> None:
    key = bytes((i * 7 + length) & 0xFF for i in range(length))
    text = independent_secret(key, hh)
    secret = DhchapSecret.parse(text)
    assert secret.key == key
    assert secret.transform == hh
    assert str(secret) == text
    assert "key" not in repr(secret) or str(key) not in repr(secret)


def test_secret_known_answer() -> None:
    assert str(DhchapSecret(KEY, 1)) == (
        "DHHC-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"
    )


@pytest.mark.parametrize(
    "text",
    [
        "DHHC-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaS:",  # CRC off by one
        "DHHC-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR",  # no trailing colon
        "DHHC-2:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
        "DHHC-1:1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
        "DHHC-1:04:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
        "DHHC-1:01:not base64!:",
        "DHHC-1:01:" + base64.b64encode(bytes(20)).decode() + ":",  # 16-byte key
    ],
)
def test_bad_secrets_refused(text: str) -> None:
    with pytest.raises(SecretFormatError):
        DhchapSecret.parse(text)


# --- transformed key and responses ----------------------------------------------------------------
@pytest.mark.parametrize("hh", [0, 1, 2, 3])
def test_transformed_key_matches_independent(hh: int) -> None:
    secret = DhchapSecret(KEY, hh)
    assert secret.transformed(HOSTNQN) == independent_transform(KEY, hh, HOSTNQN)


def test_transformed_key_known_answer() -> None:
    assert DhchapSecret(KEY, 1).transformed(HOSTNQN).hex() == TRANSFORMED_SHA256


@pytest.mark.parametrize("hash_id", list(HashId))
def test_responses_match_independent(hash_id: HashId) -> None:
    name = hash_id.hashlib_name
    key = independent_transform(KEY, 1, HOSTNQN)
    c = CHALLENGE[:32] * 2
    c = c[: hash_id.length]
    r1 = host_response(hash_id, key, c, seqnum=SEQNUM, t_id=T_ID, hostnqn=HOSTNQN, subnqn=SUBNQN)
    assert r1 == independent_r1(name, key, c, SEQNUM, T_ID)
    r2 = controller_response(
        hash_id, key, c, seqnum=SEQNUM, t_id=T_ID, hostnqn=HOSTNQN, subnqn=SUBNQN
    )
    assert r2 == independent_r2(name, key, c, SEQNUM, T_ID)
    assert r1 != r2


def test_response_known_answers() -> None:
    key = DhchapSecret(KEY, 1).transformed(HOSTNQN)
    r1 = host_response(
        HashId.SHA256, key, CHALLENGE, seqnum=SEQNUM, t_id=T_ID, hostnqn=HOSTNQN, subnqn=SUBNQN
    )
    r2 = controller_response(
        HashId.SHA256, key, CHALLENGE, seqnum=SEQNUM, t_id=T_ID, hostnqn=HOSTNQN, subnqn=SUBNQN
    )
    assert (r1.hex(), r2.hex()) == (R1_SHA256, R2_SHA256)


@pytest.mark.parametrize("hash_id", list(HashId))
def test_augmented_challenge_matches_independent(hash_id: HashId) -> None:
    session_key = bytes(range(256))
    name = hash_id.hashlib_name
    expected = hmac.new(hashlib.new(name, session_key).digest(), CHALLENGE, name).digest()
    assert augmented_challenge(hash_id, session_key, CHALLENGE) == expected


# --- FFDHE ----------------------------------------------------------------------------------------
def _e_times_2_to(n: int) -> int:
    """floor(e * 2^n), with 64 guard bits."""
    bits, total, fact, k = n + 64, 0, 1, 0
    while term := (1 << bits) // fact:
        total += term
        k += 1
        fact *= k
    return total >> 64


@pytest.mark.parametrize(
    ("bits", "x"),
    [(2048, 560316), (3072, 2625351), (4096, 5736041), (6144, 15705020), (8192, 10965728)],
)
def test_ffdhe_primes_follow_rfc7919(bits: int, x: int) -> None:
    p = (1 << bits) - (1 << (bits - 64)) + ((_e_times_2_to(bits - 130) + x) << 64) - 1
    assert getattr(ffdhe, f"FFDHE{bits}") == p


@pytest.mark.parametrize("group", [g for g in DhGroupId if g is not DhGroupId.NULL])
def test_dh_exchange_agrees_and_matches_pow(group: DhGroupId) -> None:
    a, b = DhKeyPair(group), DhKeyPair(group)
    assert len(a.public_value) == group.value_length == group.bits // 8
    shared = a.shared_secret(b.public_value)
    assert shared == b.shared_secret(a.public_value)
    assert len(shared) == group.value_length


def test_dh_value_checks() -> None:
    pair = DhKeyPair(DhGroupId.FFDHE2048)
    p = ffdhe.FFDHE2048
    for bad in (0, 1, p - 1, p):
        with pytest.raises(DhValueError):
            pair.shared_secret(
                bad.to_bytes(257, "big")[-256:] if bad < p else p.to_bytes(256, "big")
            )
    with pytest.raises(DhValueError):
        pair.shared_secret(b"\x05" * 255)


# --- messages -------------------------------------------------------------------------------------
def test_negotiate_layout_as_linux() -> None:
    raw = Negotiate(t_id=3, hashes=(1, 2, 3), dhgroups=(0, 1, 2, 3, 4, 5)).pack()
    assert len(raw) == 72
    assert raw[:8] == bytes([0, 0, 0, 0, 3, 0, 0, 1])
    assert raw[8:12] == bytes([1, 0, 3, 6])
    assert raw[12:15] == bytes([1, 2, 3])
    assert raw[42:48] == bytes([0, 1, 2, 3, 4, 5])


def test_challenge_reply_success_layouts() -> None:
    c = Challenge(t_id=1, hash_id=1, dhgroup_id=1, seqnum=SEQNUM, challenge=CHALLENGE,
                  dh_value=b"\x02" * 256).pack()  # fmt: skip
    assert c[:16] == struct.pack("<BBxxHBxBBHI", 1, 1, 1, 32, 1, 1, 256, SEQNUM)
    assert len(c) == 16 + 32 + 256
    r = Reply(t_id=1, response=b"r" * 32, ctrl_challenge=b"c" * 32, seqnum=9).pack()
    assert r[:16] == struct.pack("<BBxxHBxBBHI", 1, 2, 1, 32, 1, 0, 0, 9)
    assert r[16:] == b"r" * 32 + b"c" * 32
    uni = Reply(t_id=1, response=b"r" * 32, ctrl_challenge=None, seqnum=0).pack()
    assert uni[8] == 0
    assert uni[48:80] == bytes(32)
    s1 = Success1(t_id=1, hash_length=32, response=b"x" * 32).pack()
    assert s1[:9] == bytes([1, 3, 0, 0, 1, 0, 32, 0, 1])
    assert s1[16:] == b"x" * 32
    assert Success2(t_id=1).pack() == bytes([1, 4, 0, 0, 1, 0]) + bytes(10)
    assert Failure(t_id=1, explanation=6).pack() == bytes([0, 0xF1, 0, 0, 1, 0, 1, 6])
    assert Failure(t_id=1, explanation=1, from_host=True).pack()[1] == 0xF0


def test_messages_roundtrip() -> None:
    for message in (
        Negotiate(t_id=3, hashes=(1, 3), dhgroups=(0,)),
        Challenge(t_id=4, hash_id=2, dhgroup_id=0, seqnum=5, challenge=b"c" * 48),
        Reply(t_id=4, response=b"r" * 48, ctrl_challenge=None, seqnum=0, dh_value=b"d" * 384),
        Success1(t_id=4, hash_length=48),
        Success2(t_id=4),
        Failure(t_id=4, explanation=4),
        Failure(t_id=4, explanation=1, from_host=True),
    ):
        assert decode_message(message.pack()) == message


@given(st.binary(max_size=400))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(AuthMessageError):
        decode_message(data)


def test_auth_sqe_fields() -> None:
    send = auth_send_command(72, cid=5)
    raw = send.to_bytes()
    assert raw[0] == 0x7F
    assert raw[4] == 0x05
    assert raw[41:44] == bytes([1, 1, 0xE9])
    assert struct.unpack_from("<I", raw, 44)[0] == 72
    fields = AuthCommandFields.from_command(auth_receive_command(4096))
    assert fields.valid_protocol
    assert fields.length == 4096
    assert auth_receive_command(1).to_bytes()[4] == 0x06


TRANSFORMED_SHA256 = "2658280aa5b907586339c452118920ab328f1d80d30ce9d7383045e29cfc750f"
R1_SHA256 = "75abac5a3639af64e3f8419c4747eb612bab731f63c5ebd7e9f392c900b891a0"
R2_SHA256 = "283edb3e066dea188ae71ee24a002bad3a2967c5f2e37318d7026c27098af0c4"


# `nvme gen-dhchap-key -s HEX -m HH -l LEN -n NQN` (nvme-cli 2.3 in the Linux 6.12 lab guest): the
# printed key is the --secret transformed with that NQN (nvme_auth_transform_key), marked hh HH.
NVME_CLI_NQN = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000000"
NVME_CLI_KEYS = [
    (0, bytes(range(32)), "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"),
    (1, bytes(range(32)), "DHHC-1:01:xvgFjyEaPGT5wommLG1m56mBbQ10wbYFinCYyW+lHZZQ2ANv:"),
    (
        2,
        bytes.fromhex("".join(f"{i:02d}" for i in range(48))),
        "DHHC-1:02:paLEJRowKAo+NcUe2xH0dL68tsyV7ODzOmyPGCWUz7gtxq+BV0R7j+EHF7qpZO3TzxSl8w==:",
    ),
    (
        3,
        bytes(range(32)) * 2,
        "DHHC-1:03:kZn2Zs+KncnaZ57IZ/6xLrMuVdJRs3n6iomdDYKmsmbxArkDodp1CSHOK8A4z1i8S8L5Z/LFbwe8KLdn"
        "CRpO0Hi/3oA=:",
    ),
]


@pytest.mark.parametrize(
    ("hh", "raw", "printed"), NVME_CLI_KEYS, ids=["hh00", "hh01", "hh02", "hh03"]
)
def test_nvme_cli_gen_dhchap_key_known_answers(hh: int, raw: bytes, printed: str) -> None:
    parsed = DhchapSecret.parse(printed)
    assert parsed.transform == hh
    expected = raw if hh == 0 else DhchapSecret(raw, hh).transformed(NVME_CLI_NQN)
    assert parsed.key == expected
    assert str(parsed) == printed
