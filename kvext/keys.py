"""Client-side keys: what a user key becomes on the wire.

The KV command set carries at most 16 key bytes. A bytes key that fits goes on the wire unchanged;
anything else (a longer bytes key, and every str key) becomes its 16-byte BLAKE2b digest. str and
bytes keys hash under different personalisations, so "a" and b"a" never share a wire key. A hashed
key can collide with another key's wire key, so the client also stores the full key (``key_bytes``)
in the value header and compares it on every read.

A tenant (LMCache's ``cache_salt``; ``KVClient(tenant=...)``) is part of a key's identity: with a
tenant every key is hashed, keyed by the tenant (BLAKE2b's key parameter), and the full key carries
the tenant too. So the same prompt under two tenants is two entries, and one tenant cannot name,
read or probe another's. Without a tenant (``None``) everything is byte-identical to before.
"""

from __future__ import annotations

import hashlib

MAX_WIRE_KEY_LENGTH = 16

# A user key: str, or any bytes-like object (copied: keys are at most a few hundred bytes).
KeyLike = bytes | bytearray | memoryview | str

_PERSON_STR = b"gpucache-str"
_PERSON_BYTES = b"gpucache-bytes"
_PERSON_TENANT = b"gpucache-tenant"
_PERSON_TENANT_STR = b"gpucache-tstr"
_PERSON_TENANT_BYTES = b"gpucache-tbytes"
_TENANT_TAG = b"\0gpucache-tenant\0"  # full-key prefix: tag, u16 tenant length, tenant

Tenant = str | bytes | None


def _tenant_bytes(tenant: str | bytes) -> bytes:
    raw = tenant.encode("utf-8") if isinstance(tenant, str) else bytes(tenant)
    if not raw:
        raise ValueError("a tenant must not be empty (use None for no tenant)")
    if len(raw) > 0xFFFF:
        raise ValueError("a tenant is at most 65535 bytes")
    return raw


def _as_bytes(key: KeyLike) -> bytes:
    if type(key) is bytes and key:  # the usual key: itself, no checks to run
        return key
    if isinstance(key, str):
        encoded = key.encode("utf-8")
    elif isinstance(key, bytes | bytearray | memoryview):
        # Explicit types only: bytes(5) would silently make five zero bytes out of an int.
        encoded = bytes(key)
    else:
        raise TypeError(f"a key is bytes or str, not {type(key).__name__}")
    if not encoded:
        raise ValueError("a key must not be empty")
    return encoded


def key_bytes(key: KeyLike, tenant: Tenant = None) -> bytes:
    """The full key as bytes (a str key utf-8 encoded), as stored for the collision check;
    with a tenant, prefixed by it (so a foreign tenant's value never passes the check)."""
    full = _as_bytes(key)
    if tenant is None:
        return full
    raw = _tenant_bytes(tenant)
    return _TENANT_TAG + len(raw).to_bytes(2, "little") + raw + full


def is_hashed(key: KeyLike) -> bool:
    """Whether ``key`` goes on the wire as a digest rather than unchanged."""
    full = _as_bytes(key)  # validates first, so an empty str key is refused too
    return isinstance(key, str) or len(full) > MAX_WIRE_KEY_LENGTH


def wire_key(key: KeyLike, tenant: Tenant = None) -> bytes:
    """The 1..16 bytes that name ``key`` (of ``tenant``) on the target."""
    full = _as_bytes(key)
    if tenant is not None:
        salt = hashlib.blake2b(_tenant_bytes(tenant), digest_size=32, person=_PERSON_TENANT)
        person = _PERSON_TENANT_STR if isinstance(key, str) else _PERSON_TENANT_BYTES
        return hashlib.blake2b(
            full, digest_size=MAX_WIRE_KEY_LENGTH, person=person, key=salt.digest()
        ).digest()
    if isinstance(key, str):
        person = _PERSON_STR
    elif len(full) > MAX_WIRE_KEY_LENGTH:
        person = _PERSON_BYTES
    else:
        return full
    return hashlib.blake2b(full, digest_size=MAX_WIRE_KEY_LENGTH, person=person).digest()
