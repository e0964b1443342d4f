from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvext.framing import (
    BYTES_LAYOUT,
    DTYPE_BY_NAME,
    DTYPES,
    FIXED_HEADER_LENGTH,
    MAX_NDIM,
    FramingError,
    HeaderFlag,
    ValueHeader,
    ValueKind,
    ValueLayout,
    header_length,
    pack_header,
)
from kvext.tensor import describe, materialize, writable_view


def frame(value: object, key: bytes = b"the full key") -> bytearray:
    """header + payload in one buffer, as the client stores it."""
    layout, payload = describe(value)
    header = ValueHeader.from_layout(layout, key=key, payload_len=payload.nbytes)
    buf = bytearray(header.length + payload.nbytes)
    end = header.pack_into(buf)
    buf[end:] = payload
    return buf


def unframe(buf: bytearray) -> tuple[ValueHeader, Any]:
    header = ValueHeader.unpack(buf)
    payload = memoryview(buf)[header.length :]
    return header, materialize(header, payload)


# -- header codec ------------------------------------------------------------------------------


def test_golden_header() -> None:
    header = ValueHeader(ValueKind.NUMPY, "float16", (2, 3), b"k", 12, HeaderFlag.KEY_IS_STR)
    packed = header.pack()
    assert packed == (
        b"GPUC\x01\x01\x0a\x02\x01\x00\x01\x00" + struct.pack("<QQQ", 12, 2, 3) + b"k" + bytes(3)
    )
    assert len(packed) == header_length(1, 2) == 40


def test_dtype_table_is_one_to_one() -> None:
    assert len({d.code for d in DTYPES}) == len({d.name for d in DTYPES}) == len(DTYPES)
    assert {"bool", "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex128"} <= set(DTYPE_BY_NAME)


headers = st.builds(
    lambda dtype, shape, key, flags: ValueHeader(
        ValueKind.TORCH,
        dtype,
        shape,
        key,
        DTYPE_BY_NAME[dtype].itemsize * int(np.prod(shape)),
        flags,
    ),
    st.sampled_from(sorted(DTYPE_BY_NAME)),
    st.lists(st.integers(0, 50), max_size=6).map(tuple),
    st.binary(max_size=300),
    st.integers(0, 0xFFFF),
) | st.builds(
    lambda key, n: ValueHeader(ValueKind.BYTES, "uint8", (), key, n),
    st.binary(max_size=40),
    st.integers(0, 2**64 - 1),
)


@given(headers, st.integers(0, 16))
def test_header_round_trip(header: ValueHeader, offset: int) -> None:
    packed = header.pack()
    assert len(packed) == header.length == header_length(len(header.key), len(header.shape))
    assert len(packed) % 8 == 0
    assert ValueHeader.unpack(packed) == header
    assert ValueHeader.unpack(packed + b"payload follows") == header
    assert ValueHeader.peek_length(packed[:FIXED_HEADER_LENGTH]) == len(packed)
    buf = bytearray(offset + len(packed))
    assert header.pack_into(memoryview(buf), offset) == offset + len(packed)
    assert bytes(buf[offset:]) == packed


@given(headers)
def test_pack_header_is_the_record_packed(header: ValueHeader) -> None:
    """The put/get fast path packs what the record would, byte for byte."""
    if header.flags == 0:
        assert pack_header(header.layout, header.key, header.payload_len) == header.pack()


@given(
    st.sampled_from([*sorted(DTYPE_BY_NAME), "no-such-dtype"]),
    st.lists(st.integers(-1, 5), max_size=3).map(tuple),
    st.sampled_from(list(ValueKind)),
    st.integers(-1, 300),
    st.integers(0, 3),
)
def test_pack_header_refuses_what_the_record_refuses(
    dtype: str, shape: tuple[int, ...], kind: ValueKind, payload_len: int, key_len: int
) -> None:
    layout = ValueLayout(kind, dtype, shape)
    try:
        expected: bytes | str = ValueHeader.from_layout(
            layout, key=b"k" * key_len, payload_len=payload_len
        ).pack()
    except FramingError as exc:
        expected = str(exc)
    try:
        got: bytes | str = pack_header(layout, b"k" * key_len, payload_len)
    except FramingError as exc:
        got = str(exc)
    assert got == expected


def test_pack_into_too_small() -> None:
    header = ValueHeader(ValueKind.BYTES, "uint8", (), b"key", 0)
    with pytest.raises(ValueError, match="does not fit"):
        header.pack_into(bytearray(header.length - 1))


GOOD = ValueHeader(ValueKind.NUMPY, "float32", (2,), b"key", 8).pack()


def corrupt(offset: int, data: bytes) -> bytes:
    return GOOD[:offset] + data + GOOD[offset + len(data) :]


@pytest.mark.parametrize(
    ("buf", "match"),
    [
        (b"", "truncated"),
        (GOOD[:19], "truncated"),
        (GOOD[:-1], "truncated"),
        (corrupt(0, b"GPUX"), "magic"),
        (corrupt(4, b"\x02"), "version"),
        (corrupt(5, b"\x07"), "kind"),
        (corrupt(6, b"\x00"), "dtype code"),
        (corrupt(6, b"\xff"), "dtype code"),
        (corrupt(7, bytes([MAX_NDIM + 1])), "dimensions"),
        (corrupt(7, b"\x09"), "truncated"),  # more dims than bytes
        (corrupt(8, b"\xff\xff"), "truncated"),  # a key longer than the buffer
        (corrupt(12, struct.pack("<Q", 9)), "does not match"),
        (corrupt(20, struct.pack("<Q", 3)), "does not match"),
        (corrupt(len(GOOD) - 1, b"\x01"), "padding"),
        (corrupt(5, b"\x00"), "bytes value"),  # a bytes value with a shape
    ],
)
def test_malformed_headers(buf: bytes, match: str) -> None:
    with pytest.raises(FramingError, match=match):
        ValueHeader.unpack(buf)


def test_framing_error_is_value_error() -> None:
    assert issubclass(FramingError, ValueError)
    with pytest.raises(FramingError, match="unknown dtype"):
        ValueHeader(ValueKind.NUMPY, "float128", (), b"", 16)


# -- bytes values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"abc",
        bytearray(b"xyz"),
        memoryview(b"0123456789")[2:5],
        memoryview(bytearray(8)).cast("I"),
    ],
)
def test_bytes_round_trip(value: Any) -> None:
    header, out = unframe(frame(value))
    assert header.layout == BYTES_LAYOUT
    assert bytes(out) == bytes(
        memoryview(value).cast("B") if isinstance(value, memoryview) else value
    )


def test_describe_bytes_is_zero_copy() -> None:
    buf = bytearray(b"abc")
    _, view = describe(buf)
    buf[0] = ord("z")
    assert bytes(view) == b"zbc"


def test_describe_rejects_non_buffers_and_non_contiguous() -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        describe(3.5)
    with pytest.raises(ValueError, match="C-contiguous"):
        describe(memoryview(b"abcdef")[::2])


# -- numpy -------------------------------------------------------------------------------------

NUMPY_DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
]  # fmt: skip


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)])
def test_numpy_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    arr = raw.view(dtype).reshape(shape)
    header, out = unframe(frame(arr))
    assert header.kind is ValueKind.NUMPY
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()  # bit-exact, NaNs included


def test_numpy_describe_and_materialize_share_memory() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    _, view = describe(arr)
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), arr)
    buf = frame(arr)
    _header, out = unframe(buf)
    assert np.shares_memory(out, np.frombuffer(buf, dtype=np.uint8))


def test_numpy_requires_c_contiguous_native() -> None:
    with pytest.raises(ValueError, match="ascontiguousarray"):
        describe(np.zeros((4, 4)).T)
    with pytest.raises(ValueError, match="byte-swapped"):
        describe(np.zeros(3, dtype=">f4"))
    with pytest.raises(TypeError, match="not supported"):
        describe(np.array(["a"]))


# -- torch -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    ["float16", "bfloat16", "float32", "float64", "int64", "bool", "complex64", "float8_e4m3fn"],
)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_torch_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    torch = pytest.importorskip("torch")
    torch_dtype = getattr(torch, dtype)
    nbytes = int(np.prod(shape)) * DTYPE_BY_NAME[dtype].itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    if dtype == "bool":
        raw &= 1
    t = raw.view(torch_dtype).reshape(shape)
    header, out = unframe(frame(t))
    assert header.kind is ValueKind.TORCH
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch_dtype
    assert tuple(out.shape) == shape
    assert torch.equal(out.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_torch_is_zero_copy_both_ways() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(8, dtype=torch.bfloat16)[2:]  # contiguous, at a storage offset
    _, view = describe(t)
    t[0] = 100
    assert bytes(view[:2]) == t[:1].view(torch.uint8).numpy().tobytes()
    buf = frame(t)
    header, out = unframe(buf)
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert out.data_ptr() == base + header.length


def test_torch_from_read_only_payload_does_not_warn() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(4, dtype=torch.float16)
    buf = frame(t)
    header = ValueHeader.unpack(buf)
    out = materialize(header, bytes(buf[header.length :]))
    assert torch.equal(out, t)


def test_torch_requires_contiguous_cpu() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"\.contiguous\(\)"):
        describe(torch.zeros(4, 4).T)
    with pytest.raises(TypeError, match="staging"):
        describe(torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="resolve_conj"):
        describe(torch.zeros(2, dtype=torch.complex64).conj())
    with pytest.raises(TypeError, match="not supported"):
        describe(torch.zeros(2, dtype=torch.float8_e4m3fnuz))


def test_torch_requires_grad_is_fine() -> None:
    torch = pytest.importorskip("torch")
    t = torch.ones(3, requires_grad=True)
    _, view = describe(t)
    assert view.nbytes == 12


def test_materialize_checks_payload_length() -> None:
    header = ValueHeader(ValueKind.BYTES, "uint8", (), b"", 3)
    with pytest.raises(ValueError, match="payload has 2 bytes"):
        materialize(header, bytearray(2))


# -- writable_view -----------------------------------------------------------------------------


def test_writable_view_targets_the_destination() -> None:
    dest = bytearray(4)
    writable_view(dest)[:] = b"abcd"
    assert dest == b"abcd"
    arr = np.zeros((2, 2), dtype=np.float16)
    view = writable_view(arr)
    assert view.nbytes == 8
    view[:] = np.ones(4, dtype=np.float16).tobytes()
    assert (arr == 1).all()
    assert writable_view(np.zeros((), np.int32)).nbytes == 4


def test_writable_view_torch() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    src = torch.full((2, 3), 1.5, dtype=torch.bfloat16)
    writable_view(t)[:] = src.view(torch.uint8).numpy().tobytes()
    assert torch.equal(t, src)
    with pytest.raises(ValueError, match="contiguous"):
        writable_view(torch.zeros(3, 3).T)
    with pytest.raises(TypeError, match="staging"):
        writable_view(torch.zeros(3, device="meta"))


def test_writable_view_errors() -> None:
    with pytest.raises(TypeError, match="read-only"):
        writable_view(b"abc")
    with pytest.raises(TypeError, match="read-only"):
        writable_view(memoryview(bytearray(3)).toreadonly())
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        writable_view(ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        writable_view(np.zeros((3, 3)).T)
    with pytest.raises(ValueError, match="C-contiguous"):
        writable_view(memoryview(bytearray(6))[::2])
    with pytest.raises(TypeError, match="bytes-like"):
        writable_view([1, 2, 3])


def test_no_numpy_or_torch_import_for_bytes_values() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from kvext.tensor import describe, materialize, writable_view;"
        "from kvext.framing import ValueHeader;"
        "layout, view = describe(b'abc'); writable_view(bytearray(3));"
        "h = ValueHeader.from_layout(layout, key=b'k', payload_len=3);"
        "assert bytes(materialize(h, view)) == b'abc';"
        "assert 'numpy' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
