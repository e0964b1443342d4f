from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvext.keys import MAX_WIRE_KEY_LENGTH, is_hashed, key_bytes, wire_key


@pytest.mark.parametrize("key", [b"a", b"\x00", b"x" * 16, bytes(range(16))])
def test_short_bytes_keys_go_on_the_wire_unchanged(key: bytes) -> None:
    assert wire_key(key) == key
    assert not is_hashed(key)
    assert key_bytes(key) == key


def test_long_bytes_keys_are_hashed() -> None:
    key = b"x" * 17
    assert is_hashed(key)
    assert wire_key(key) == hashlib.blake2b(key, digest_size=16, person=b"gpucache-bytes").digest()
    assert key_bytes(key) == key


def test_str_keys_are_always_hashed_and_domain_separated() -> None:
    assert is_hashed("a")
    assert len(wire_key("a")) == 16
    assert wire_key("a") != wire_key(b"a")
    long = "é" * 20
    assert wire_key(long) != wire_key(long.encode())
    assert key_bytes(long) == long.encode("utf-8")


def test_bytes_like_keys_accepted() -> None:
    assert wire_key(bytearray(b"ab")) == b"ab"
    assert wire_key(memoryview(b"ab" * 10)) == wire_key(b"ab" * 10)


@pytest.mark.parametrize("key", [b"", ""])
def test_empty_key_rejected(key: bytes | str) -> None:
    with pytest.raises(ValueError, match="empty"):
        wire_key(key)
    with pytest.raises(ValueError, match="empty"):
        key_bytes(key)
    with pytest.raises(ValueError, match="empty"):
        is_hashed(key)


def test_non_key_types_rejected() -> None:
    with pytest.raises(TypeError, match="bytes or str"):
        wire_key(5)  # type: ignore[arg-type]


@given(st.binary(min_size=1, max_size=64) | st.text(min_size=1, max_size=40))
def test_wire_key_is_deterministic_and_fits(key: bytes | str) -> None:
    wk = wire_key(key)
    assert 1 <= len(wk) <= MAX_WIRE_KEY_LENGTH
    assert wk == wire_key(key)
    assert is_hashed(key) == (wk != key)


@given(st.binary(min_size=17, max_size=64), st.binary(min_size=17, max_size=64))
def test_distinct_long_keys_get_distinct_wire_keys(a: bytes, b: bytes) -> None:
    assert (wire_key(a) == wire_key(b)) == (a == b)
