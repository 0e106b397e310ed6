"""Tensor compression codecs for the wire: fp16, bf16, int8, int4, top-k (+ optional shuffle-lz4).

Importing ``shared.wire`` registers them (it imports this module), so any receiver decodes them.

Entry layouts
-------------
Every entry keeps the ORIGINAL tensor's ``"dtype"`` and ``"shape"``; the decoder reconstructs exactly
that dtype and shape from the entry alone. These codecs apply to floating dtypes only (float32,
float16, bfloat16, float64); an entry with another dtype is refused. Multi-byte numbers are
little-endian. ``n`` = prod(shape) (1 for a 0-d tensor), blocks run over the flattened C-order
tensor, ``n_blocks = ceil(n / block)`` and the last block may be partial.

  * ``"fp16"`` / ``"bf16"``: ``data`` = the n values as IEEE half / bfloat16 bit patterns (2n bytes).
  * ``"int8"``: ``block`` (int >= 1), ``scales`` (n_blocks float32: absmax/127 of each block, finite,
    >= 0 and <= float32 max / 127), ``data`` (n int8 values in [-127, 127]); value = q * scale.
  * ``"int4"``: ``block``, ``scales`` (n_blocks float32: absmax/7, <= float32 max / 7), ``data`` (ceil(n/2) bytes:
    element 2i in the low nibble, 2i+1 in the high nibble, each nibble = q + 7 with q in [-7, 7], so
    nibble 15 is invalid; when n is odd the last high nibble is 0).
  * int8 and int4, optional ``"channels": "rms"`` with ``channel_scales`` (shape[-1] float32, finite,
    > 0; the tensor has 2+ dims and 2+ channels): the sender divided each channel (last dimension) by
    its root-mean-square before the blockwise quantisation, so the value is q * scale * channel_scale
    (and scale * qmax * channel_scale must stay <= float32 max). Without it, one channel many times
    larger than the rest (LLM residual streams have them: "massive activations") sets the absmax of
    every block it falls in, and the other channels of those blocks round to 0. Specs use it by
    default (``int8`` = ``int8:channels=rms``); ``int8:channels=none`` is plain blockwise absmax. The
    encoder scales channels only when there are at least 64 rows (then the channel scales cost <= 6 %
    of the int8 payload, as the block scales do); smaller tensors go plain.
  * ``"topk"``: ``k`` (int, 0 <= k <= n), ``index_dtype`` ("uint8" | "uint16" | "uint32" | "uint64",
    the smallest one that holds n - 1), ``indices`` (k flat indices, strictly increasing, < n),
    ``value_dtype`` ("float32" | "float16"), ``data`` (the k values); every other element is 0.

Scales are float32 (not fp16): fp16 scales would overflow for absmax > 65504 * 127 and flush small
gradients' scales to zero; the cost is 4 bytes per block (6 % of the int8 payload at block 64, so
int8 is 3.76x smaller than float32 and int4 7.1x; channel scaling adds 4 bytes a channel). Error
bounds: int8 <= absmax/254 per block, int4 <= absmax/14 (plus float32 rounding, plus the rounding
into a float16/bfloat16 declared dtype), with absmax taken in the channel-scaled domain and the
bound multiplied back by the channel's scale.

Optional ``"post": "shuffle-lz4"``: every bin field above (``data``, ``scales``, ``indices``) is
byte-shuffled by its element size (byte j of every element together, lane after lane) and then
LZ4-block compressed (no size prefix). The uncompressed length of every field is implied by
shape and params, so decompression is bounded by it and must give exactly that many bytes. An
absent ``post`` means none; any other value is refused.

Encoders fall back to the lossless path (lz4, else raw) where the lossy one cannot represent the
tensor: int8/int4 when it holds NaN/Inf, fp16/bf16 when a finite value would overflow. topk
carries NaN/Inf as values, and switches fp16 values to float32 when they would overflow.

Specs
-----
``CodecSpec.parse("NAME[:KEY=VALUE[,KEY=VALUE...]][+POST]")``: ``fp32`` (lossless: the lz4 path),
``raw``, ``lz4``, ``fp16``, ``bf16``, ``int8:block=64,channels=rms``, ``int4:block=64,channels=rms``,
``topk:k=100`` / ``topk:ratio=0.01`` (+ ``values=fp16|fp32``), POST = ``shuffle-lz4`` (lossy only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import lz4.block
import numpy as np
import torch

from shared.protocol.wire import (DEFAULT_MAX_MESSAGE_BYTES, MAX_DIM, Message, WireError, _bin, _q, _short, decode, encode, register_codec, tensor_from_bytes, tensor_to_bytes)

__all__ = [
    "CodecSpec",
    "CodecPolicy",
    "ErrorFeedback",
    "KNOWN_CODECS",
    "POSTS",
    "measure",
    "resolve_k",
    "topk_dense",
]

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

SHUFFLE_LZ4 = "shuffle-lz4"
POSTS: tuple[str, ...] = (SHUFFLE_LZ4,)
DEFAULT_BLOCK = 64
CHANNEL_MODES: tuple[str, ...] = ("rms",)  # on the wire; an absent "channels" means none
MIN_CHANNEL_ROWS = 64  # fewer rows: channel scales would cost over 6 % of the int8 payload; plain blocks
DEFAULT_CHANNELS = "rms"  # spec default for int8/int4; "channels=none" is plain blockwise absmax
MAX_BLOCK = MAX_DIM
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
_INDEX_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
}
_VALUE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_SPEC_VALUES = {"fp32": "float32", "fp16": "float16"}  # topk "values=" spelling -> wire value_dtype
_F32_MAX = float(torch.finfo(torch.float32).max)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# The per-element work is numpy: single-threaded and predictable. torch's intra-op threads on a
# small, busy machine make each op 10-100x slower (OpenMP threads spinning against other processes).


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
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


def _np_flat(t: torch.Tensor) -> np.ndarray:
    """Flattened numpy float32 (float64 stays float64) array of a CPU floating tensor; may share memory."""
    t = t.detach().cpu().reshape(-1).resolve_neg()
    if t.dtype == torch.bfloat16:
        return _bf16_bits_to_f32(t.view(torch.int16).numpy().view(np.uint16))
    return t.numpy()


def _np_f32(t: torch.Tensor) -> np.ndarray:
    a = _np_flat(t)
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Writable torch tensor of wire float ``dtype`` from a float32/float16 numpy array (a new one)."""
    if dtype == "bfloat16":
        return torch.from_numpy(_f32_to_bf16_bits(a.astype(np.float32, copy=False)).view(np.int16)).view(torch.bfloat16)
    npdt = {"float32": np.float32, "float16": np.float16, "float64": np.float64}[dtype]
    if a.dtype == npdt and a.flags.writeable:
        return torch.from_numpy(a)
    with np.errstate(over="ignore"):  # to float16: out-of-range values become inf, as a cast does
        return torch.from_numpy(a.astype(npdt))


def _as_bytes(arr: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _shuffle(buf: memoryview, itemsize: int) -> Any:
    a = np.frombuffer(buf, dtype=np.uint8)
    if itemsize == 1 or a.size == 0:
        return a
    return np.ascontiguousarray(a.reshape(-1, itemsize).T)


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1 or not raw:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def _finish(fields_: dict[str, tuple[memoryview, int]], post: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """Entry fields from the bin fields (buffer, element size) and scalar params, applying ``post``."""
    out = dict(params)
    if post == SHUFFLE_LZ4:
        packed = {k: lz4.block.compress(_shuffle(buf, isz), store_size=False) for k, (buf, isz) in fields_.items()}
        if sum(map(len, packed.values())) < sum(buf.nbytes for buf, _ in fields_.values()):
            out.update(packed)
            out["post"] = SHUFFLE_LZ4
            return out
    elif post is not None:
        raise ValueError(f"unknown post-processing {post!r} (known: {', '.join(POSTS)})")
    out.update({k: buf for k, (buf, _) in fields_.items()})
    return out


def _post_of(entry: dict[str, Any]) -> str | None:
    if "post" not in entry:
        return None
    post = entry["post"]
    if post not in POSTS:  # also refuses non-str values
        raise WireError(f"unknown post-processing {_q(post)} (known: {', '.join(POSTS)})")
    return post


def _has(what: str, plural: str = "have", singular: str = "has") -> str:
    return plural if what.endswith("s") else singular


def _field(entry: dict[str, Any], key: str, need: int, itemsize: int, post: str | None, what: str, why: str) -> bytes:
    """The uncompressed bytes of bin field ``key``: exactly ``need`` of them, or WireError."""
    data = _bin(entry, key)
    if post is None:
        if len(data) != need:
            raise WireError(f"{what} {_has(what)} {len(data)} bytes, {why} needs {need}")
        return data
    try:
        raw = lz4.block.decompress(data, uncompressed_size=need)  # bounded by the implied size
    except Exception as e:
        raise WireError(f"corrupt lz4 block in {what}: {_short(str(e), 120)}") from None
    if len(raw) != need:
        raise WireError(f"{what} {_has(what, 'decompress', 'decompresses')} to {len(raw)} bytes, {why} needs {need}")
    return _unshuffle(raw, itemsize)


def _need_float(dtype: str, codec: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise WireError(f"{codec} codec needs a floating dtype, got {_q(dtype)}")


def _int_param(entry: dict[str, Any], key: str, codec: str, lo: int, hi: int) -> int:
    v = entry.get(key)
    if type(v) is not int:
        raise WireError(f"{codec} entry needs an int {key!r}, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise WireError(f"{codec} {key} {v} out of range [{lo}, {hi}]")
    return v


def _str_param(entry: dict[str, Any], key: str, codec: str, known: Mapping[str, Any]) -> str:
    v = entry.get(key)
    if not isinstance(v, str):
        raise WireError(f"{codec} entry needs a str {key!r}, got {type(v).__name__}")
    if v not in known:
        raise WireError(f"{codec} {key} {_q(v)} unknown (known: {', '.join(known)})")
    return v


# ---------------------------------------------------------------------------------------------
# fp16 / bf16
# ---------------------------------------------------------------------------------------------


def _half_codec(name: str, wire_dtype: str):  # noqa: ANN202
    def enc(t: torch.Tensor, dtype: str, post: str | None = None) -> dict[str, Any] | None:
        if dtype not in FLOAT_DTYPES:
            return None
        if dtype == wire_dtype:
            return _finish({"data": (tensor_to_bytes(t), 2)}, post, {})
        a = _np_flat(t)
        if wire_dtype == "float16":
            with np.errstate(over="ignore"):
                h = a.astype("<f2")
            bad = np.isinf(h)
        else:
            with np.errstate(over="ignore"):  # float64 -> float32 -> bf16 (double rounding: still < 1 ulp)
                h = _f32_to_bf16_bits(a.astype(np.float32))
            bad = (h & 0x7FFF) == 0x7F80
        if bad.any() and np.isfinite(a[bad]).any():
            return None  # a finite value would become inf: send it losslessly instead
        return _finish({"data": (_as_bytes(h.astype(h.dtype.newbyteorder("<"), copy=False)), 2)}, post, {})

    def dec(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        _need_float(dtype, name)
        post = _post_of(entry)
        n = _numel(shape)
        raw = _field(entry, "data", 2 * n, 2, post, f"{name} payload", f"shape {list(shape)}")
        if dtype == wire_dtype:
            return tensor_from_bytes(raw, wire_dtype, shape)
        if wire_dtype == "float16":
            a = np.frombuffer(raw, dtype="<f2")
            if dtype == "float64":
                return torch.from_numpy(a.astype(np.float64)).reshape(shape)
            a = a.astype(np.float32)
        else:
            a = _bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2"))
        return _to_torch(a, dtype).reshape(shape)

    return enc, dec


# ---------------------------------------------------------------------------------------------
# int8 / int4 blockwise absmax
# ---------------------------------------------------------------------------------------------


def _quantise(x: np.ndarray, block: int, qmax: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Flat float32 ``x`` -> (int8 q in [-qmax, qmax] (n,), float32 scales (n_blocks,)); None if non-finite."""
    n = x.size
    full = n // block * block
    nb = -(-n // block)
    q = np.empty(n, dtype=np.int8)
    scales = np.empty(nb, dtype=np.float32)
    parts = []
    if full:
        parts.append((x[:full].reshape(-1, block), q[:full].reshape(-1, block), scales[: full // block]))
    if full < n:
        parts.append((x[full:].reshape(1, -1), q[full:].reshape(1, -1), scales[full // block :]))
    for rows, qrows, srows in parts:
        amax = np.abs(rows).max(axis=1)
        if not np.isfinite(amax).all():
            return None
        np.divide(amax, np.float32(qmax), out=srows)
        with np.errstate(divide="ignore", over="ignore"):
            inv = np.where(amax > 0, np.float32(qmax) / amax, np.float32(0))
        np.minimum(inv, np.float32(_F32_MAX), out=inv)  # subnormal blocks: finite, never inf * 0
        y = rows * inv[:, None]
        np.rint(y, out=y)
        np.clip(y, -qmax, qmax, out=y)
        qrows[...] = y  # exact: y already holds integers in [-qmax, qmax]
    return q, scales


def _channel_rms(x: np.ndarray, width: int) -> np.ndarray | None:
    """float32 root-mean-square of each of the ``width`` channels (last dim) of flat ``x``; 1 where it is 0.

    Summed in float64 (squares of large float32 values overflow float32); None if ``x`` is not finite.
    The result is <= the channel's absmax, so it is finite, and x / rms stays within sqrt(rows).
    """
    rows = x.reshape(-1, width)
    rms = np.sqrt(np.einsum("ij,ij->j", rows, rows, dtype=np.float64) / rows.shape[0])
    if not np.isfinite(rms).all():
        return None
    out = rms.astype(np.float32)
    out[out == 0] = 1.0  # all-zero (or underflowing) channel
    return out


def _dequantise(q: np.ndarray, scales: np.ndarray, block: int, n: int) -> np.ndarray:
    """float32 values q * scale of each element's block (scales are validated: no overflow)."""
    out = np.empty(n, dtype=np.float32)
    full = n // block * block
    nf = full // block
    if full:
        np.multiply(q[:full].reshape(nf, block), scales[:nf, None], out=out[:full].reshape(nf, block))
    if full < n:
        np.multiply(q[full:], scales[nf], out=out[full:])
    return out


def _check_block(block: Any, where: str) -> int:
    if type(block) is not int:
        raise ValueError(f"{where}: block must be an int, got {type(block).__name__}")
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"{where}: block {block} out of range [1, {MAX_BLOCK}]")
    return block


def _int_codec(name: str, bits: int):  # noqa: ANN202
    qmax = 127 if bits == 8 else 7

    def payload_len(n: int) -> int:
        return n if bits == 8 else (n + 1) // 2

    def enc(t: torch.Tensor, dtype: str, block: int = DEFAULT_BLOCK, channels: str | None = None,
            post: str | None = None) -> dict[str, Any] | None:
        _check_block(block, name)
        if channels not in (None, *CHANNEL_MODES):
            raise ValueError(f"{name}: channels must be one of {', '.join(CHANNEL_MODES)}, got {channels!r}")
        if dtype not in FLOAT_DTYPES:
            return None
        x = _np_f32(t)
        width = t.shape[-1] if t.dim() >= 2 else 0
        cscales = None
        if channels == "rms" and width >= 2 and x.size >= MIN_CHANNEL_ROWS * width:
            cscales = _channel_rms(x, width)
            if cscales is None:
                return None  # NaN/Inf: send losslessly
            x = (x.reshape(-1, width) / cscales).reshape(-1)
        res = _quantise(x, block, qmax)
        if res is None:
            return None  # NaN/Inf: send losslessly
        q, scales = res
        if bits == 8:
            data = q
        else:
            q += 7  # nibbles 0..14
            nib = q.view(np.uint8)
            if nib.size % 2:
                nib = np.concatenate([nib, np.zeros(1, dtype=np.uint8)])
            data = nib[1::2] << 4
            data |= nib[0::2]
        fields_ = {"scales": (_as_bytes(scales.astype("<f4", copy=False)), 4), "data": (_as_bytes(data), 1)}
        params: dict[str, Any] = {"block": block}
        if cscales is not None:
            fields_["channel_scales"] = (_as_bytes(cscales.astype("<f4", copy=False)), 4)
            params["channels"] = channels
        return _finish(fields_, post, params)

    def dec(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        _need_float(dtype, name)
        block = _int_param(entry, "block", name, 1, MAX_BLOCK)
        post = _post_of(entry)
        n = _numel(shape)
        nb = -(-n // block)
        sraw = _field(
            entry, "scales", 4 * nb, 4, post, f"{name} scales",
            f"shape {list(shape)} in {nb} block(s) of {block}",
        )
        draw = _field(entry, "data", payload_len(n), 1, post, f"{name} payload", f"shape {list(shape)}")
        scales = np.frombuffer(sraw, dtype="<f4")
        if nb and not ((scales >= 0).all() and (scales <= _F32_MAX / qmax).all()):  # NaN fails both
            raise WireError(f"{name} scales must be finite, >= 0 and <= {_F32_MAX / qmax:.4g}")
        cscales = None
        if "channels" in entry:
            _str_param(entry, "channels", name, dict.fromkeys(CHANNEL_MODES))
            if len(shape) < 2 or shape[-1] < 2:
                raise WireError(f"{name} channels need a tensor of 2+ dims with 2+ channels, got shape {list(shape)}")
            width = shape[-1]
            craw = _field(entry, "channel_scales", 4 * width, 4, post, f"{name} channel_scales",
                          f"shape {list(shape)} with {width} channels")
            cscales = np.frombuffer(craw, dtype="<f4")
            cmax = float(cscales.max()) if cscales.size else 0.0
            smax = float(scales.max()) if nb else 0.0
            if not ((cscales > 0).all() and math.isfinite(cmax)) or smax * qmax * cmax > _F32_MAX:
                raise WireError(f"{name} channel_scales must be finite and > 0, and scale x channel scale "
                                f"x {qmax} must stay <= float32 max")
        if bits == 8:
            q = np.frombuffer(draw, dtype=np.int8)
            bad = n and int(q.min()) < -qmax  # only -128 is out of range
        else:
            packed = np.frombuffer(draw, dtype=np.uint8)
            if n % 2 and packed[-1] >> 4:
                raise WireError(f"{name} padding nibble must be 0 (odd element count {n})")
            nib = np.empty(2 * packed.size, dtype=np.uint8)
            np.bitwise_and(packed, 15, out=nib[0::2])
            np.right_shift(packed, 4, out=nib[1::2])
            q = nib.view(np.int8)
            q -= 7  # nibble 15 (invalid) -> 8
            q = q[:n]
            bad = n and int(q.max()) > qmax  # values are -7..8 here
        if bad:
            raise WireError(f"{name} payload holds a value outside [-{qmax}, {qmax}]")
        out = _dequantise(q, scales, block, n)
        if cscales is not None and n:
            out.reshape(-1, shape[-1])[...] *= cscales
        return _to_torch(out, dtype).reshape(shape)

    return enc, dec


# ---------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------


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
    values = _SPEC_VALUES.get(values, values)
    if values not in _VALUE_DTYPES:
        raise ValueError(f"topk values must be one of {', '.join(_SPEC_VALUES)}, got {values!r}")
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    k = min(k, n)
    if flat.device.type == "cpu":
        a = _np_flat(flat)
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


def _topk_encode(
    t: torch.Tensor,
    dtype: str,
    k: int | None = None,
    ratio: float | None = None,
    values: str = "float32",
    post: str | None = None,
) -> dict[str, Any] | None:
    if dtype not in FLOAT_DTYPES:
        return None
    if values not in _VALUE_DTYPES:
        raise ValueError(f"topk values must be one of {', '.join(_VALUE_DTYPES)}, got {values!r}")
    a = _np_flat(t)
    n = a.size
    kk = resolve_k(n, k, ratio)
    idx = _largest(a, kk)
    v = _wire_values(a[idx], values)
    vname = "float16" if v.dtype.itemsize == 2 else "float32"
    idt = index_dtype_for(n)
    fields_ = {
        "indices": (_as_bytes(idx.astype(_INDEX_DTYPES[idt])), _INDEX_DTYPES[idt].itemsize),
        "data": (_as_bytes(v), v.dtype.itemsize),
    }
    return _finish(fields_, post, {"k": kk, "index_dtype": idt, "value_dtype": vname})


def _topk_decode(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    _need_float(dtype, "topk")
    n = _numel(shape)
    k = entry.get("k")
    if type(k) is not int:
        raise WireError(f"topk entry needs an int 'k', got {type(k).__name__}")
    if not 0 <= k <= n:
        raise WireError(f"topk k={k} out of range for shape {list(shape)} ({n} elements)")
    idt = _str_param(entry, "index_dtype", "topk", _INDEX_DTYPES)
    if idt != index_dtype_for(n):
        raise WireError(f"topk index_dtype {idt!r} for {n} elements must be {index_dtype_for(n)!r}")
    vdt = _str_param(entry, "value_dtype", "topk", _VALUE_DTYPES)
    post = _post_of(entry)
    inp, vnp = _INDEX_DTYPES[idt], _VALUE_DTYPES[vdt]
    why = f"k={k} {idt}"
    iraw = _field(entry, "indices", k * inp.itemsize, inp.itemsize, post, "topk indices", why)
    vraw = _field(entry, "data", k * vnp.itemsize, vnp.itemsize, post, "topk values", f"k={k} {vdt}")
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
        return _to_torch(out, dtype).reshape(shape)
    npdt = {"float32": np.float32, "float16": np.float16, "float64": np.float64}[dtype]
    out = np.zeros(n, dtype=npdt)
    with np.errstate(over="ignore"):
        out[idx] = vals  # float32 -> float16 casts exactly as torch does (round to nearest even)
    return torch.from_numpy(out).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

_WIRE = {
    "fp16": _half_codec("fp16", "float16"),
    "bf16": _half_codec("bf16", "bfloat16"),
    "int8": _int_codec("int8", 8),
    "int4": _int_codec("int4", 4),
    "topk": (_topk_encode, _topk_decode),
}
for _name, (_enc, _dec) in _WIRE.items():
    register_codec(_name, _enc, _dec, replace=True)  # replace: tolerate a module reload


# ---------------------------------------------------------------------------------------------
# CodecSpec
# ---------------------------------------------------------------------------------------------

# spec name -> {param: type}
_SPEC_PARAMS: dict[str, dict[str, type]] = {
    "fp32": {},
    "fp16": {},
    "bf16": {},
    "int8": {"block": int, "channels": str},
    "int4": {"block": int, "channels": str},
    "topk": {"k": int, "ratio": float, "values": str},
    "raw": {},
    "lz4": {},
}
KNOWN_CODECS: tuple[str, ...] = tuple(_SPEC_PARAMS)
_LOSSLESS_WIRE = {"fp32": "lz4", "lz4": "lz4", "raw": "raw"}


def _known() -> str:
    return f"known codecs: {', '.join(KNOWN_CODECS)}"


@dataclass(frozen=True, eq=True)
class CodecSpec:
    """A parsed codec spec: ``name``, ``params`` (read-only mapping, only what was given) and ``post``.

    ``str(spec)`` is canonical (params sorted) and ``CodecSpec.parse(str(spec)) == spec``.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    post: str | None = None

    def __post_init__(self) -> None:
        if self.name not in _SPEC_PARAMS:
            raise ValueError(f"unknown codec {self.name!r} ({_known()})")
        allowed = _SPEC_PARAMS[self.name]
        if self.params is None:
            object.__setattr__(self, "params", {})
        if not isinstance(self.params, Mapping):
            raise ValueError(f"codec {self.name!r}: params must be a mapping")
        clean: dict[str, Any] = {}
        for key, value in self.params.items():
            if key not in allowed:
                takes = ", ".join(allowed) or "no params"
                raise ValueError(f"codec {self.name!r} has no param {key!r} (it takes: {takes}; {_known()})")
            clean[key] = _check_param(self.name, key, value)
        if self.name == "topk" and ("k" in clean) == ("ratio" in clean):
            raise ValueError("codec 'topk' needs exactly one of k=<int> or ratio=<float>, e.g. 'topk:ratio=0.01'")
        if self.post is not None:
            if self.post not in POSTS:
                raise ValueError(f"unknown post-processing {self.post!r} (known: {', '.join(POSTS)})")
            if not self.lossy:
                raise ValueError(f"codec {self.name!r} is lossless; '+{self.post}' applies to fp16, bf16, int8, int4, topk")
        object.__setattr__(self, "params", MappingProxyType(dict(sorted(clean.items()))))

    # -- parsing / printing

    @classmethod
    def parse(cls, text: str | CodecSpec) -> CodecSpec:
        """Parse ``NAME[:KEY=VALUE[,KEY=VALUE...]][+POST]``; ValueError (listing known codecs) if bad."""
        if isinstance(text, CodecSpec):
            return text
        if not isinstance(text, str):
            raise ValueError(f"codec spec must be a str, got {type(text).__name__} ({_known()})")
        head, plus, post = text.strip().partition("+")
        if plus and not post.strip():
            raise ValueError(f"codec spec {text!r}: empty post-processing after '+'")
        name, colon, rest = head.partition(":")
        name = name.strip()
        if name not in _SPEC_PARAMS:
            raise ValueError(f"unknown codec {name!r} ({_known()})")
        params: dict[str, Any] = {}
        if colon:
            if not rest.strip():
                raise ValueError(f"codec spec {text!r}: empty params after ':'")
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key, value = key.strip(), value.strip()
                if not eq or not key or not value:
                    raise ValueError(f"codec spec {text!r}: params must be key=value, got {item.strip()!r}")
                if key in params:
                    raise ValueError(f"codec spec {text!r}: param {key!r} given twice")
                allowed = _SPEC_PARAMS[name]
                if key not in allowed:
                    takes = ", ".join(allowed) or "no params"
                    raise ValueError(f"codec {name!r} has no param {key!r} (it takes: {takes}; {_known()})")
                params[key] = _parse_value(name, key, value, allowed[key])
        return cls(name, params, post.strip() if plus else None)

    def __str__(self) -> str:
        s = self.name
        if self.params:
            s += ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        if self.post:
            s += "+" + self.post
        return s

    def __repr__(self) -> str:
        return f"CodecSpec({str(self)!r})"

    def __hash__(self) -> int:
        return hash(str(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodecSpec) and str(self) == str(other)

    # -- what the wire encoder needs

    @property
    def lossy(self) -> bool:
        """True for codecs that only apply to floating tensors (everything but fp32/raw/lz4)."""
        return self.name not in _LOSSLESS_WIRE

    @property
    def wire_codec(self) -> str:
        """The registered wire codec this spec encodes with ("fp32" -> "lz4")."""
        return _LOSSLESS_WIRE.get(self.name, self.name)

    def wire_params(self) -> dict[str, Any]:
        """Keyword arguments for the wire codec's encode function."""
        if not self.lossy:
            return {}
        out: dict[str, Any] = {}
        if self.name in ("int8", "int4"):
            out["block"] = self.params.get("block", DEFAULT_BLOCK)
            channels = self.params.get("channels", DEFAULT_CHANNELS)
            if channels != "none":
                out["channels"] = channels
        elif self.name == "topk":
            out.update({k: v for k, v in self.params.items() if k in ("k", "ratio")})
            out["values"] = _SPEC_VALUES[self.params.get("values", "fp32")]
        if self.post:
            out["post"] = self.post
        return out


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _parse_value(name: str, key: str, value: str, typ: type) -> Any:
    try:
        if typ is int:
            return int(value, 10)
        if typ is float:
            return float(value)
    except ValueError:
        raise ValueError(f"codec {name!r}: param {key}={value!r} is not a valid {typ.__name__}") from None
    return value


def _check_param(name: str, key: str, value: Any) -> Any:
    if key == "block":
        return _check_block(value, f"codec {name!r}")
    if key == "k":
        if type(value) is not int or value < 1:
            raise ValueError(f"codec {name!r}: k must be an int >= 1, got {value!r}")
        return value
    if key == "ratio":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"codec {name!r}: ratio must be a number, got {type(value).__name__}")
        value = float(value)
        if not 0 < value <= 1:
            raise ValueError(f"codec {name!r}: ratio must be in (0, 1], got {value!r}")
        return value
    if key == "channels":
        if value not in (*CHANNEL_MODES, "none"):
            raise ValueError(f"codec {name!r}: channels must be one of {', '.join(CHANNEL_MODES)}, none; got {value!r}")
        return value
    if key == "values":
        if value not in _SPEC_VALUES:
            raise ValueError(f"codec {name!r}: values must be one of {', '.join(_SPEC_VALUES)}, got {value!r}")
        return value
    raise AssertionError(key)  # pragma: no cover - _SPEC_PARAMS and this function agree


# ---------------------------------------------------------------------------------------------
# CodecPolicy
# ---------------------------------------------------------------------------------------------


@dataclass
class CodecPolicy:
    """Which codec spec each kind of traffic uses; every field is validated with CodecSpec.parse."""

    activations: str = "fp32"
    gradients: str = "fp32"
    uploads: str = "fp32"
    downloads: str = "fp32"

    def __setattr__(self, key: str, value: Any) -> None:
        if key in _POLICY_FIELDS:
            if isinstance(value, CodecSpec):
                value = str(value)
            if not isinstance(value, str):
                raise ValueError(f"codec policy {key!r} must be a codec spec str, got {type(value).__name__}")
            try:
                CodecSpec.parse(value)
            except ValueError as e:
                raise ValueError(f"codec policy {key!r}: {e}") from None
        super().__setattr__(key, value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> CodecPolicy:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"codec policy must be a mapping, got {type(d).__name__}")
        extra = sorted(set(d) - set(_POLICY_FIELDS))
        if extra:
            raise ValueError(f"codec policy: unknown field(s) {', '.join(map(repr, extra))} (fields: {', '.join(_POLICY_FIELDS)})")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in _POLICY_FIELDS}

    def spec(self, field_name: str) -> CodecSpec:
        if field_name not in _POLICY_FIELDS:
            raise ValueError(f"codec policy has no field {field_name!r} (fields: {', '.join(_POLICY_FIELDS)})")
        return CodecSpec.parse(getattr(self, field_name))


_POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CodecPolicy))


# ---------------------------------------------------------------------------------------------
# Error feedback (sender side, for sparsified gradients)
# ---------------------------------------------------------------------------------------------


class ErrorFeedback:
    """Per-key residuals for top-k sparsification at the sender.

    ``compress(key, g, k)`` adds the stored residual to ``g``, keeps the k largest magnitudes and
    returns that sparse-as-dense tensor (``g``'s dtype, shape and device: exactly what the receiver
    reconstructs when it is sent with ``topk:k=<k>`` and the same ``values``), storing
    ``residual = (g + old_residual) - sent``. Residuals are kept in float32 (float64 for float64
    inputs). A residual whose shape or device no longer matches the key's tensor is dropped.
    """

    def __init__(self) -> None:
        self._residuals: dict[Any, torch.Tensor] = {}

    def compress(
        self,
        key: Any,
        tensor: torch.Tensor,
        k: int | None = None,
        *,
        ratio: float | None = None,
        values: str = "fp32",
    ) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError("ErrorFeedback.compress needs a floating torch.Tensor")
        kk = resolve_k(tensor.numel(), k, ratio)
        acc_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        acc = tensor.detach().to(acc_dtype, copy=True)
        old = self._residuals.get(key)
        if old is not None and old.shape == acc.shape and old.device == acc.device:
            acc += old
        sent = topk_dense(acc, kk, values).to(tensor.dtype)
        self._residuals[key] = acc - sent.to(acc_dtype)
        return sent

    def residual(self, key: Any) -> torch.Tensor | None:
        return self._residuals.get(key)

    def reset(self, key: Any = None) -> None:
        """Forget one key's residual, or all of them."""
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def __contains__(self, key: Any) -> bool:
        return key in self._residuals

    def __len__(self) -> int:
        return len(self._residuals)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def measure(spec: str | CodecSpec, tensor: torch.Tensor, repeats: int = 5) -> dict[str, Any]:
    """Bytes, ratio and speed of sending ``tensor`` as one message with codec ``spec``.

    ``bytes`` is the whole encoded message; ``ratio_vs_fp32`` = numel * 4 / bytes;
    ``encode_decode_mb_s`` = fp32 MB (1e6 bytes) of input per second of encode + decode, best of
    ``repeats``; errors are of the decoded tensor against the input, in float64.
    """
    cs = CodecSpec.parse(spec)
    t = tensor.detach().cpu().contiguous()
    msg = Message("measure", tensors={"x": t})
    limit = max(DEFAULT_MAX_MESSAGE_BYTES, 4 * t.numel() * t.element_size() + (1 << 20))
    best = math.inf
    data, out = b"", t
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        data = encode(msg, tensor_codecs={"x": cs})
        out = decode(data, max_bytes=limit).tensors["x"]
        best = min(best, time.perf_counter() - t0)
    ref = t.to(torch.float64)
    diff = out.to(torch.float64) - ref
    norm = float(ref.norm()) if ref.numel() else 0.0
    fp32_bytes = t.numel() * 4
    return {
        "codec": str(cs),
        "bytes": len(data),
        "ratio_vs_fp32": fp32_bytes / len(data),
        "encode_decode_mb_s": fp32_bytes / 1e6 / best if best > 0 else math.inf,
        "max_abs_err": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_err": float(diff.norm()) / norm if norm else float(diff.norm()),
    }
