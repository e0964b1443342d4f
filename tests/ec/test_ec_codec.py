"""The fragment codec: round trips, any k of k+m decode, checksums catch corruption."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ec.codec import (
    FRAGMENT_HEADER_LENGTH,
    Backend,
    CodecError,
    ErasureCode,
    Fragment,
    Scheme,
    available_backends,
    parse_fragment,
    user_key,
)
from kvext.framing import BYTES_LAYOUT
from kvext.tensor import describe


def _wire(fragment: Fragment) -> bytes:
    return b"".join(bytes(b) for b in fragment.buffers())


def test_both_pyeclib_backends_load() -> None:
    assert set(available_backends()) == {Backend.ISA_L_RS_VAND, Backend.LIBERASURECODE_RS_VAND}


@pytest.mark.parametrize("backend", list(Backend))
@pytest.mark.parametrize("size", [64 * 1024, 100_003, 1 << 20])
def test_every_k_subset_decodes(backend: Backend, size: int) -> None:
    code = ErasureCode(4, 2, backend)
    data = os.urandom(size)
    fragments = [
        parse_fragment(_wire(f))
        for f in code.encode("key", BYTES_LAYOUT, memoryview(data), generation=7)
    ]
    assert len(fragments) == 6
    assert fragments[0].header.scheme is Scheme.CODED
    for subset in itertools.combinations(fragments, 4):
        out = bytearray(size)
        code.decode_into(list(subset), memoryview(out))
        assert out == data
        assert code.decode_bytes(list(subset)) == data
    with pytest.raises(CodecError):
        code.decode_into(fragments[:3], memoryview(bytearray(size)))


def test_small_values_are_replicated_m_plus_1_times() -> None:
    code = ErasureCode(4, 2)
    data = b"tiny"
    fragments = code.encode(b"k", BYTES_LAYOUT, memoryview(data), generation=1)
    assert [f.header.scheme for f in fragments] == [Scheme.REPLICA] * 3
    assert code.decode_bytes([parse_fragment(_wire(fragments[2]))]) == data


def test_reconstruct_rebuilds_the_lost_fragments_exactly() -> None:
    code = ErasureCode(4, 2)
    data = os.urandom(300_000)
    fragments = code.encode("k", BYTES_LAYOUT, memoryview(data), generation=3)
    rebuilt = code.reconstruct([fragments[i] for i in (0, 2, 3, 5)], [1, 4])
    assert [_wire(f) for f in rebuilt] == [_wire(fragments[1]), _wire(fragments[4])]


def test_a_fragment_decodes_alone_with_another_k_and_m() -> None:
    writer = ErasureCode(3, 3, Backend.LIBERASURECODE_RS_VAND)
    data = os.urandom(200_000)
    fragments = [
        parse_fragment(_wire(f)) for f in writer.encode("k", BYTES_LAYOUT, memoryview(data), 1)
    ]
    reader = ErasureCode(4, 2, Backend.ISA_L_RS_VAND)
    assert reader.decode_bytes(fragments[3:]) == data


def test_tensor_layout_and_str_key_travel_in_each_fragment() -> None:
    arr = np.arange(100_000, dtype=np.float32).reshape(100, 1000)
    layout, view = describe(arr)
    fragment = ErasureCode().encode("layer.0", layout, view, 1)[5]
    parsed = parse_fragment(_wire(fragment))
    assert parsed.value_header.shape == (100, 1000)
    assert parsed.value_header.dtype == "float32"
    assert user_key(parsed.value_header) == "layer.0"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 7))
def test_any_flipped_byte_is_caught(position: int, bit: int) -> None:
    data = bytes(range(256)) * 300  # 76800 bytes: coded
    fragment = ErasureCode().encode("k", BYTES_LAYOUT, memoryview(data), 1)[1]
    wire = bytearray(_wire(fragment))
    wire[position % len(wire)] ^= 1 << bit
    with pytest.raises(CodecError):
        parse_fragment(wire)


def test_header_only_parse_reads_a_prefix() -> None:
    fragment = ErasureCode().encode("k", BYTES_LAYOUT, memoryview(os.urandom(1 << 20)), 9)[0]
    wire = _wire(fragment)
    head = parse_fragment(wire[: FRAGMENT_HEADER_LENGTH + 64], header_only=True)
    assert head.header.generation == 9
    assert head.header.record_length == len(wire)
