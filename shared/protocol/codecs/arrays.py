"""Array helpers shared by the lossy codecs: float conversions (bfloat16 included), chunked torch ops, byte shuffling.

The per-element work runs on the calling thread. torch's intra-op threads on a small, busy machine make
each op slower (OpenMP threads waiting for cores that other processes hold: some 4x, timed by hand beside a
busy process, with threads that sleep when idle; 10-100x with threads that spin), and a codec runs beside the
tier's own compute. So where torch runs more than one thread (``runs_inline`` is false), the float casts
(float32 to and from fp16 and bf16) and the int codecs' block maxima call torch's vectorised kernels on chunks
below torch's parallel grain (``GRAIN`` elements: an op that small runs on the calling thread), and the rest is
numpy, which is single-threaded and works on the whole array in one call. A torch call per chunk costs a few
microseconds of dispatch, about as much as the chunk's arithmetic: where torch runs one thread (the tiers'
setting in the benches), each op is one torch call on the whole array instead, about 3x faster, with the same bits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


GRAIN = 32768  # at::internal::GRAIN_SIZE: torch runs an elementwise op on fewer elements on the calling thread


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def chunk_size(unit: int = 1) -> int:
    """Elements per chunk: the largest multiple of ``unit`` below ``GRAIN`` (at least one ``unit``)."""
    return max(unit, (GRAIN - 1) // unit * unit)


def spans(n: int, size: int) -> Iterator[slice]:
    """[0, n) in slices of ``size`` elements (the last one may be shorter)."""
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def runs_inline() -> bool:
    """Whether torch runs this thread's ops on one thread (``torch.get_num_threads() == 1``): then a whole-array
    op never leaves the calling thread, and codecs make one call per op instead of one per chunk."""
    return torch.get_num_threads() == 1


def converted(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flat contiguous ``src`` cast to ``dtype`` (torch's rounding: to nearest even), in one call where torch runs
    inline, else chunk by chunk."""
    out, size = torch.empty(src.numel(), dtype=dtype), chunk_size()
    if runs_inline():
        return out.copy_(src)
    for part, source in zip(out.split(size), src.split(size)):  # one call makes all the views
        part.copy_(source)
    return out


def flat_f32(t: torch.Tensor) -> torch.Tensor:
    """A floating CPU tensor as a flat contiguous float32 tensor (a view where it is one already)."""
    t = t.detach().cpu().reshape(-1).resolve_neg()
    if t.dtype == torch.float32:
        return t.contiguous()
    if t.dtype == torch.float64:
        return t.float()  # exact enough: a float64 tensor is rare on the wire, and float32 rounding is what int codecs use
    return converted(t, torch.float32)


def view_of(buf: Any, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor over the bytes of ``buf`` (read from, never written: a read-only body is fine)."""
    if len(buf) == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # torch warns that it cannot protect a read-only buffer; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a flat CPU tensor (little-endian hosts: as they lie) as a flat memoryview."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    a = t.numpy()
    return as_bytes(a.astype(a.dtype.newbyteorder("<"), copy=False))


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
