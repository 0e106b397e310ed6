"""The topk codec: the k largest magnitudes of a floating tensor as (flat index, value) pairs.

Entry layout (dtype and shape are the ORIGINAL tensor's, see ``shared.protocol.codecs``):

  * ``"topk"``: ``k`` (int, 0 <= k <= n), ``index_dtype`` ("uint8" | "uint16" | "uint32" | "uint64",
    the smallest one that holds n - 1), ``indices`` (k flat indices, strictly increasing, < n),
    ``value_dtype`` ("float32" | "float16"), ``data`` (the k values); every other element is 0.

topk carries NaN/Inf as values, and switches fp16 values to float32 when they would overflow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from shared.protocol.codecs.arrays import as_bytes, np_flat, numel, to_torch
from shared.protocol.codecs.entries import FLOAT_DTYPES, finish_entry, need_float, post_of, read_field, str_param
from shared.protocol.tensors import WireError

_INDEX_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
}
_VALUE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
SPEC_VALUES = {"fp32": "float32", "fp16": "float16"}  # topk "values=" spelling -> wire value_dtype


def index_dtype_for(n: int) -> str:
    """The smallest unsigned wire index dtype that holds every flat index of ``n`` elements."""
    if n <= 1 << 8:
        return "uint8"
    if n <= 1 << 16:
        return "uint16"
    if n <= 1 << 32:
        return "uint32"
    return "uint64"


def resolve_k(n: int, k: int | None = None, ratio: float | None = None) -> int:
    """k for ``n`` elements: ``k`` clamped to n, or ceil(ratio * n) clamped to [min(1, n), n]."""
    if (k is None) == (ratio is None):
        raise ValueError("topk needs exactly one of k=<int> or ratio=<float>")
    if k is not None:
        if type(k) is not int or k < 0:
            raise ValueError(f"topk k must be an int >= 0, got {k!r}")
        return min(k, n)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"topk ratio must be a number in (0, 1], got {ratio!r}")
    return min(n, max(1, math.ceil(ratio * n))) if n else 0


def _largest(a: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of the k largest |a| (NaN counts as largest)."""
    n = a.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    idx = np.argpartition(np.abs(a), n - k)[n - k :]
    idx.sort()
    return idx.astype(np.int64, copy=False)


def _wire_values(v: np.ndarray, values: str) -> np.ndarray:
    """Selected values in the wire value dtype: float16 if asked and no finite value overflows, else float32."""
    v32 = v.astype("<f4", copy=False)
    if values == "float16":
        with np.errstate(over="ignore"):
            h = v32.astype("<f2")
        inf = np.isinf(h)
        if not (inf.any() and np.isfinite(v32[inf]).any()):
            return h
    return v32


def topk_dense(tensor: torch.Tensor, k: int, values: str = "float32") -> torch.Tensor:
    """Exactly what a receiver reconstructs from ``tensor`` sent as topk with ``k`` (same dtype/shape/device)."""
    values = SPEC_VALUES.get(values, values)
    if values not in _VALUE_DTYPES:
        raise ValueError(f"topk values must be one of {', '.join(SPEC_VALUES)}, got {values!r}")
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    k = min(k, n)
    if flat.device.type == "cpu":
        a = np_flat(flat)
        idx_np = _largest(a, k)
        v = torch.from_numpy(_wire_values(a[idx_np], values).astype(np.float32))
        idx = torch.from_numpy(idx_np)
    else:  # same selection rule on the tensor's own device
        if 0 < k < n:
            idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        else:
            idx = torch.arange(k, device=flat.device)
        v = flat[idx].to(torch.float32)
        if values == "float16":
            h = v.to(torch.float16)
            inf = torch.isinf(h)
            if not bool((inf & torch.isfinite(v)).any()):
                v = h
    out = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    out[idx.to(out.device)] = v.to(device=out.device, dtype=tensor.dtype)
    return out.reshape(tensor.shape)


def topk_encode(
    t: torch.Tensor,
    dtype: str,
    k: int | None = None,
    ratio: float | None = None,
    values: str = "float32",
    post: str | None = None,
) -> dict[str, Any] | None:
    """The topk encode_fn: entry fields of the k (or ceil(ratio * n)) largest magnitudes of ``t``."""
    if dtype not in FLOAT_DTYPES:
        return None
    if values not in _VALUE_DTYPES:
        raise ValueError(f"topk values must be one of {', '.join(_VALUE_DTYPES)}, got {values!r}")
    a = np_flat(t)
    n = a.size
    kk = resolve_k(n, k, ratio)
    idx = _largest(a, kk)
    v = _wire_values(a[idx], values)
    vname = "float16" if v.dtype.itemsize == 2 else "float32"
    idt = index_dtype_for(n)
    fields_ = {
        "indices": (as_bytes(idx.astype(_INDEX_DTYPES[idt])), _INDEX_DTYPES[idt].itemsize),
        "data": (as_bytes(v), v.dtype.itemsize),
    }
    return finish_entry(fields_, post, {"k": kk, "index_dtype": idt, "value_dtype": vname})


def topk_decode(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The topk decode_fn: the dense tensor, zeros but at the entry's indices; WireError if inconsistent."""
    need_float(dtype, "topk")
    n = numel(shape)
    k = entry.get("k")
    if type(k) is not int:
        raise WireError(f"topk entry needs an int 'k', got {type(k).__name__}")
    if not 0 <= k <= n:
        raise WireError(f"topk k={k} out of range for shape {list(shape)} ({n} elements)")
    idt = str_param(entry, "index_dtype", "topk", _INDEX_DTYPES)
    if idt != index_dtype_for(n):
        raise WireError(f"topk index_dtype {idt!r} for {n} elements must be {index_dtype_for(n)!r}")
    vdt = str_param(entry, "value_dtype", "topk", _VALUE_DTYPES)
    post = post_of(entry)
    inp, vnp = _INDEX_DTYPES[idt], _VALUE_DTYPES[vdt]
    why = f"k={k} {idt}"
    iraw = read_field(entry, "indices", k * inp.itemsize, inp.itemsize, post, "topk indices", why)
    vraw = read_field(entry, "data", k * vnp.itemsize, vnp.itemsize, post, "topk values", f"k={k} {vdt}")
    idx = np.frombuffer(iraw, dtype=inp)
    if k:
        top = int(idx.max())
        if top >= n:
            raise WireError(f"topk index {top} out of range for shape {list(shape)} ({n} elements)")
        if k > 1 and not (np.diff(idx.astype(np.int64)) > 0).all():
            raise WireError("topk indices must be strictly increasing")
    vals = np.frombuffer(vraw, dtype=vnp).astype(np.float32)
    if dtype == "bfloat16":
        out = np.zeros(n, dtype=np.float32)  # zeros stay zeros in bf16
        out[idx] = vals
        return to_torch(out, dtype).reshape(shape)
    npdt = {"float32": np.float32, "float16": np.float16, "float64": np.float64}[dtype]
    out = np.zeros(n, dtype=npdt)
    with np.errstate(over="ignore"):
        out[idx] = vals  # float32 -> float16 casts exactly as torch does (round to nearest even)
    return torch.from_numpy(out).reshape(shape)
