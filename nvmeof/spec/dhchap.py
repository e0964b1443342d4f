"""DH-HMAC-CHAP secrets and computations, as Linux ``drivers/nvme/common/auth.c`` does them.

- Secret representation ``DHHC-1:hh:<base64(key || crc32le(key))>:``: hh 00 (key used as is),
  01/02/03 (transformed with SHA-256/384/512); key 32, 48 or 64 bytes (nvme_auth_extract_key).
- Transformed key K' = HMAC_hh(key, NQN || "NVMe-over-Fabrics") (nvme_auth_transform_key): the host
  key with the host NQN, the controller key with the subsystem NQN.
- With a DH group, the challenge is augmented: C' = HMAC_H(H(session key), C)
  (nvme_auth_augmented_challenge), the session key being the DH shared secret, big-endian and
  padded to the prime's size (crypto_kpp_maxsize).
- R1 = HMAC_H(K'host, C1' || le32 S1 || le16 T_ID || SC_C || "HostHost" || HostNQN || 0 || SubNQN)
- R2 = HMAC_H(K'ctrl, C2' || le32 S2 || le16 T_ID || 0 || "Controller" || SubNQN || 0 || HostNQN)

Hashing uses hashlib/hmac; the FFDHE group arithmetic uses ``cryptography`` (OpenSSL).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import secrets
import struct
import warnings
import zlib
from collections.abc import Iterator

import attrs

from nvmeof.spec import ffdhe
from nvmeof.spec.auth import DhGroupId, HashId

SECRET_PREFIX = "DHHC-1"
SECRET_KEY_LENGTHS = (32, 48, 64)
_TRANSFORM_SUFFIX = b"NVMe-over-Fabrics"

_PRIMES = {
    DhGroupId.FFDHE2048: ffdhe.FFDHE2048,
    DhGroupId.FFDHE3072: ffdhe.FFDHE3072,
    DhGroupId.FFDHE4096: ffdhe.FFDHE4096,
    DhGroupId.FFDHE6144: ffdhe.FFDHE6144,
    DhGroupId.FFDHE8192: ffdhe.FFDHE8192,
}


class SecretFormatError(ValueError):
    """Not a valid ``DHHC-1:hh:...:`` secret."""


@attrs.frozen(repr=False)
class DhchapSecret:
    """A DH-HMAC-CHAP secret: the key and the hash that transforms it (0: none)."""

    key: bytes
    transform: int = 0

    def __attrs_post_init__(self) -> None:
        if len(self.key) not in SECRET_KEY_LENGTHS:
            raise SecretFormatError(f"a key is 32, 48 or 64 bytes, not {len(self.key)}")
        if self.transform not in (0, 1, 2, 3):
            raise SecretFormatError(f"transform hash {self.transform} is not 0..3")

    def __repr__(self) -> str:  # never print the key
        return f"DhchapSecret(<{len(self.key)} bytes>, transform={self.transform})"

    @classmethod
    def parse(cls, text: str) -> DhchapSecret:
        parts = text.strip().split(":")
        if len(parts) != 4 or parts[0] != SECRET_PREFIX or parts[3] != "":
            raise SecretFormatError("a secret looks like DHHC-1:hh:<base64>:")
        if len(parts[1]) != 2 or not parts[1].isdigit():
            raise SecretFormatError(f"bad transform field {parts[1]!r}")
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SecretFormatError(f"secret is not base64: {exc}") from exc
        key, crc = raw[:-4], raw[-4:]
        if len(key) not in SECRET_KEY_LENGTHS:
            raise SecretFormatError(f"a key is 32, 48 or 64 bytes, not {len(key)}")
        if struct.unpack("<I", crc)[0] != zlib.crc32(key):
            raise SecretFormatError("secret CRC mismatch")
        return cls(key=key, transform=int(parts[1]))

    @classmethod
    def generate(cls, length: int = 32, transform: int = 1) -> DhchapSecret:
        return cls(key=secrets.token_bytes(length), transform=transform)

    def __str__(self) -> str:
        encoded = base64.b64encode(self.key + struct.pack("<I", zlib.crc32(self.key))).decode()
        return f"{SECRET_PREFIX}:{self.transform:02d}:{encoded}:"

    def transformed(self, nqn: str) -> bytes:
        """K': the key as the HMAC of R1/R2 uses it (nvme_auth_transform_key)."""
        if self.transform == 0:
            return self.key
        name = HashId(self.transform).hashlib_name
        return hmac.new(self.key, nqn.encode() + _TRANSFORM_SUFFIX, name).digest()


def as_secret(value: str | DhchapSecret) -> DhchapSecret:
    return value if isinstance(value, DhchapSecret) else DhchapSecret.parse(value)


def augmented_challenge(hash_id: HashId, session_key: bytes, challenge: bytes) -> bytes:
    """C' = HMAC_H(H(session key), C)."""
    hashed = hashlib.new(hash_id.hashlib_name, session_key).digest()
    return hmac.new(hashed, challenge, hash_id.hashlib_name).digest()


def host_response(
    hash_id: HashId,
    key: bytes,
    challenge: bytes,
    *,
    seqnum: int,
    t_id: int,
    hostnqn: str,
    subnqn: str,
    sc_c: int = 0,
) -> bytes:
    """R1: what the host answers the controller's challenge C1 (already augmented) with."""
    mac = hmac.new(key, digestmod=hash_id.hashlib_name)
    mac.update(challenge)
    mac.update(struct.pack("<IHB", seqnum, t_id, sc_c))
    mac.update(b"HostHost")
    mac.update(hostnqn.encode())
    mac.update(b"\0")
    mac.update(subnqn.encode())
    return mac.digest()


def controller_response(
    hash_id: HashId,
    key: bytes,
    challenge: bytes,
    *,
    seqnum: int,
    t_id: int,
    hostnqn: str,
    subnqn: str,
) -> bytes:
    """R2: what the controller answers the host's challenge C2 (already augmented) with."""
    mac = hmac.new(key, digestmod=hash_id.hashlib_name)
    mac.update(challenge)
    mac.update(struct.pack("<IHB", seqnum, t_id, 0))
    mac.update(b"Controller")
    mac.update(subnqn.encode())
    mac.update(b"\0")
    mac.update(hostnqn.encode())
    return mac.digest()


def responses_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def new_seqnum() -> int:
    """A random non-zero 32-bit sequence number (nvme_auth_get_seqnum)."""
    while True:
        value = secrets.randbits(32)
        if value:
            return value


class DhValueError(ValueError):
    """The peer's DH public value is out of range or the wrong size."""


def prime(group: DhGroupId) -> int:
    return _PRIMES[group]


class DhKeyPair:
    """An ephemeral FFDHE key pair of one group (the arithmetic is OpenSSL's)."""

    def __init__(self, group: DhGroupId) -> None:
        if group is DhGroupId.NULL:
            raise ValueError("the NULL group has no key pair")
        from cryptography.hazmat.primitives.asymmetric import dh

        self.group = group
        with _quiet():
            self._numbers = dh.DHParameterNumbers(_PRIMES[group], ffdhe.FFDHE_GENERATOR)
            self._private = self._numbers.parameters().generate_private_key()
            y = self._private.public_key().public_numbers().y
        self.public_value = y.to_bytes(group.value_length, "big")

    def shared_secret(self, peer_value: bytes) -> bytes:
        """The session key: g^xy mod p, big-endian, padded to the prime's size."""
        from cryptography.hazmat.primitives.asymmetric import dh

        p = _PRIMES[self.group]
        if len(peer_value) != self.group.value_length:
            raise DhValueError(
                f"DH value of {len(peer_value)} bytes, {self.group.value_length} expected"
            )
        y = int.from_bytes(peer_value, "big")
        if not 1 < y < p - 1:
            raise DhValueError("DH public value out of range")
        with _quiet():
            peer = dh.DHPublicNumbers(y, self._numbers).public_key()
            try:
                shared = self._private.exchange(peer)
            except ValueError as exc:
                raise DhValueError(f"DH exchange failed: {exc}") from exc
        return shared.rjust(self.group.value_length, b"\0")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Recent cryptography releases mark finite-field DH deprecated; NVMe DH-HMAC-CHAP mandates
    the RFC 7919 groups, so silence that warning around our own use only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Diffie-Hellman over finite fields.*")
        yield
