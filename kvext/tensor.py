"""Values as flat byte views, and back: raw buffers, numpy arrays and torch CPU tensors.

numpy and torch are never imported here to detect a value: if the caller's value is a numpy array
or torch tensor, its module is already in ``sys.modules``. So the library works without either
installed, and importing it does not pay for them. Every view is of the caller's memory, never a
copy; the payload's byte order is the host's (every supported host is little-endian).
"""

from __future__ import annotations

import sys
from typing import Any

from kvext.framing import BYTES_LAYOUT, DTYPE_BY_NAME, ValueHeader, ValueKind, ValueLayout

# What ``materialize`` gives back: a bytes-like object, a numpy.ndarray or a torch.Tensor.
Value = Any

_CUDA_HINT = "CUDA tensors need a staging path (copy to a pinned CPU tensor first) for now"


def describe(value: object, role: str = "value") -> tuple[ValueLayout, memoryview]:
    """The layout of ``value`` and a flat unsigned-byte view of its memory (no copy); ``role``
    names it in errors."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        _check_torch(value, role)
        return ValueLayout(ValueKind.TORCH, _torch_dtype_name(value), tuple(value.shape)), (
            _torch_bytes(value)
        )
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        _check_numpy(value, role)
        return ValueLayout(ValueKind.NUMPY, _numpy_dtype_name(value), tuple(value.shape)), (
            _numpy_bytes(value)
        )
    return BYTES_LAYOUT, _buffer_bytes(value, role)


def materialize(header: ValueHeader, payload: memoryview | bytearray | bytes) -> Value:
    """Rebuild the value ``header`` describes over ``payload``'s memory (no copy, but see torch)."""
    if _nbytes(payload) != header.payload_len:
        raise ValueError(f"payload has {_nbytes(payload)} bytes, header says {header.payload_len}")
    if header.kind is ValueKind.BYTES:
        return payload
    if header.kind is ValueKind.NUMPY:
        import numpy as np

        try:
            dtype = np.dtype(header.dtype)
        except TypeError:
            raise TypeError(
                f"numpy has no dtype {header.dtype!r} here (install ml_dtypes for it)"
            ) from None
        return np.frombuffer(payload, dtype=dtype).reshape(header.shape)
    import torch

    dtype = getattr(torch, header.dtype)
    if header.payload_len == 0:
        return torch.empty(header.shape, dtype=dtype)  # frombuffer refuses an empty buffer
    if memoryview(payload).readonly:
        # torch tensors are always writable, and torch.frombuffer warns on read-only memory that
        # a write would corrupt; the one copy here is the price of a read-only source.
        payload = bytearray(payload)
    flat = torch.frombuffer(payload, dtype=torch.uint8)
    return flat.view(dtype).reshape(header.shape)


def writable_view(out: object) -> memoryview:
    """A flat writable byte view of a destination buffer, for receiving a value in place."""
    return describe_out(out)[1]


def describe_out(out: object) -> tuple[ValueLayout, memoryview]:
    """``describe`` for a destination: the layout of ``out`` and a flat *writable* byte view of
    its memory, for receiving a value in place."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(out, torch.Tensor):
        return describe(out, "out")  # a CPU tensor is always writable
    np = sys.modules.get("numpy")
    if np is not None and isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise TypeError("out is a read-only numpy array; pass a writable one")
        return describe(out, "out")
    view = _buffer_bytes(out, "out")
    if view.readonly:
        raise TypeError(f"out ({type(out).__name__}) is read-only; pass a bytearray or array")
    return BYTES_LAYOUT, view


def _nbytes(payload: memoryview | bytearray | bytes) -> int:
    return payload.nbytes if isinstance(payload, memoryview) else len(payload)


def _buffer_bytes(value: object, role: str) -> memoryview:
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{role} must be bytes-like, a numpy array or a torch tensor,"
            f" not {type(value).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError(f"{role} is not C-contiguous; pass a contiguous copy")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _check_numpy(arr: Any, role: str) -> None:
    if not arr.flags.c_contiguous:
        raise ValueError(f"{role} is not C-contiguous; pass numpy.ascontiguousarray({role})")
    if not arr.dtype.isnative:
        raise ValueError(
            f"{role} is byte-swapped; pass {role}.astype({role}.dtype.newbyteorder('='))"
        )
    _numpy_dtype_name(arr)


def _numpy_dtype_name(arr: Any) -> str:
    name: str = arr.dtype.name
    if name not in DTYPE_BY_NAME:
        raise TypeError(f"numpy dtype {arr.dtype} is not supported")
    return name


def _numpy_bytes(arr: Any) -> memoryview:
    # reshape(-1) of a C-contiguous array is a view; viewing it as uint8 also covers dtypes the
    # buffer protocol refuses (ml_dtypes' bfloat16) and 0-d arrays (which cannot change itemsize).
    import numpy as np

    return memoryview(arr.reshape(-1).view(np.uint8))


def _check_torch(tensor: Any, role: str) -> None:
    torch = sys.modules["torch"]
    if tensor.device.type != "cpu":
        raise TypeError(f"{role} is on {tensor.device}: {_CUDA_HINT}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{role} has layout {tensor.layout}; only dense (strided) tensors work")
    if not tensor.is_contiguous():
        raise ValueError(f"{role} is not contiguous; pass {role}.contiguous()")
    if tensor.is_conj() or tensor.is_neg():
        raise ValueError(
            f"{role} has a lazy conj/neg bit; pass {role}.resolve_conj().resolve_neg()"
        )
    _torch_dtype_name(tensor)


def _torch_dtype_name(tensor: Any) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPE_BY_NAME:
        raise TypeError(f"torch dtype {tensor.dtype} is not supported")
    return name


def _torch_bytes(tensor: Any) -> memoryview:
    # detach() shares storage (and lets .numpy() work with requires_grad); the uint8 view covers
    # bfloat16 and float8, which have no buffer-protocol format; numpy() shares memory too.
    return memoryview(tensor.detach().reshape(-1).view(sys.modules["torch"].uint8).numpy())
