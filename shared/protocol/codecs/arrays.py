"""numpy helpers shared by the lossy codecs: float conversions (bfloat16 included) and byte shuffling.

The per-element work is numpy: single-threaded and predictable. torch's intra-op threads on a small,
busy machine make each op 10-100x slower (OpenMP threads spinning against other processes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 patterns, round to nearest even (NaN -> 0x7FC0), as torch does."""
    u = a.view(np.uint32)
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u
    r >>= 16
    out = r.astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def np_flat(t: torch.Tensor) -> np.ndarray:
    """Flattened numpy float32 (float64 stays float64) array of a CPU floating tensor; may share memory."""
    t = t.detach().cpu().reshape(-1).resolve_neg()
    if t.dtype == torch.bfloat16:
        return bf16_bits_to_f32(t.view(torch.int16).numpy().view(np.uint16))
    return t.numpy()


def np_f32(t: torch.Tensor) -> np.ndarray:
    """``np_flat`` as float32."""
    a = np_flat(t)
    return a if a.dtype == np.float32 else a.astype(np.float32)


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Writable torch tensor of wire float ``dtype`` from a float32/float16 numpy array (a new one)."""
    if dtype == "bfloat16":
        return torch.from_numpy(f32_to_bf16_bits(a.astype(np.float32, copy=False)).view(np.int16)).view(torch.bfloat16)
    npdt = {"float32": np.float32, "float16": np.float16, "float64": np.float64}[dtype]
    if a.dtype == npdt and a.flags.writeable:
        return torch.from_numpy(a)
    with np.errstate(over="ignore"):  # to float16: out-of-range values become inf, as a cast does
        return torch.from_numpy(a.astype(npdt))


def as_bytes(arr: np.ndarray) -> memoryview:
    """The C-order bytes of ``arr`` as a flat memoryview."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def shuffle(buf: memoryview, itemsize: int) -> Any:
    """Bytes of ``buf`` regrouped lane by lane: byte j of every ``itemsize``-byte element together."""
    a = np.frombuffer(buf, dtype=np.uint8)
    if itemsize == 1 or a.size == 0:
        return a
    return np.ascontiguousarray(a.reshape(-1, itemsize).T)


def unshuffle(raw: bytes, itemsize: int) -> bytes:
    """Inverse of ``shuffle``."""
    if itemsize == 1 or not raw:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()
