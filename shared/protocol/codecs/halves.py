"""The fp16 and bf16 codecs: floating tensors sent as IEEE half / bfloat16 values.

Entry layout (dtype and shape are the ORIGINAL tensor's, see ``shared.protocol.codecs``):

  * ``"fp16"`` / ``"bf16"``: ``data`` = the n values as IEEE half / bfloat16 bit patterns (2n bytes).

The encoder falls back to the lossless path when a finite value would overflow (become inf).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shared.protocol.codecs.arrays import (as_bytes, bf16_bits_to_f32, converted, f32_to_bf16_bits, flat_f32,
                                           np_flat, numel, tensor_bytes, to_torch, view_of)
from shared.protocol.codecs.entries import FLOAT_DTYPES, finish_entry, need_float, post_of, read_field
from shared.protocol.tensors import DecodeFn, EncodeFn, tensor_from_bytes, tensor_to_bytes, torch_dtype

# the lowest bit pattern (sign bit cleared) of an infinite or NaN half / bfloat16 value: an all-ones exponent
_NON_FINITE = {"float16": 0x7C00, "bfloat16": 0x7F80}


def half_codec(name: str, wire_dtype: str) -> tuple[EncodeFn, DecodeFn]:
    """(encode_fn, decode_fn) of codec ``name`` carrying values as wire dtype "float16" or "bfloat16"."""

    def enc(t: torch.Tensor, dtype: str, post: str | None = None) -> dict[str, Any] | None:
        if dtype not in FLOAT_DTYPES:
            return None
        if dtype == wire_dtype:
            return finish_entry({"data": (tensor_to_bytes(t), 2)}, post, {})
        if t.dtype == torch.float32:  # the common case, on torch's kernels (see ``arrays``)
            half = converted(flat_f32(t), torch_dtype(wire_dtype))
            bits = half.view(torch.int16).numpy().view(np.uint16)
            # every value finite (no NaN, nothing overflowed): no all-ones exponent. One pass over the result,
            # half the bytes of a pass over the input for its extremes.
            if bits.size == 0 or int(np.bitwise_and(bits, 0x7FFF).max()) < _NON_FINITE[wire_dtype]:
                return finish_entry({"data": (tensor_bytes(half), 2)}, post, {})
        a = np_flat(t)  # NaN, Inf, values that may overflow, other dtypes: numpy, checked value by value
        if wire_dtype == "float16":
            with np.errstate(over="ignore"):
                h = a.astype("<f2")
            bad = np.isinf(h)
        else:
            with np.errstate(over="ignore"):  # float64 -> float32 -> bf16 (double rounding: still < 1 ulp)
                h = f32_to_bf16_bits(a.astype(np.float32))
            bad = (h & 0x7FFF) == 0x7F80
        if bad.any() and np.isfinite(a[bad]).any():
            return None  # a finite value would become inf: send it losslessly instead
        return finish_entry({"data": (as_bytes(h.astype(h.dtype.newbyteorder("<"), copy=False)), 2)}, post, {})

    def dec(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        need_float(dtype, name)
        post = post_of(entry)
        n = numel(shape)
        raw = read_field(entry, "data", 2 * n, 2, post, f"{name} payload", f"shape {list(shape)}")
        if dtype == wire_dtype:
            return tensor_from_bytes(raw, wire_dtype, shape)
        if dtype == "float32":
            return converted(view_of(raw, torch_dtype(wire_dtype)), torch.float32).reshape(shape)
        if wire_dtype == "float16":
            a = np.frombuffer(raw, dtype="<f2")
            if dtype == "float64":
                return torch.from_numpy(a.astype(np.float64)).reshape(shape)
            a = a.astype(np.float32)
        else:
            a = bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2"))
        return to_torch(a, dtype).reshape(shape)

    return enc, dec
