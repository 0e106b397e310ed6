"""The int8 and int4 codecs: blockwise absmax quantisation, with optional per-channel rms scaling.

Entry layouts (dtype and shape are the ORIGINAL tensor's, see ``shared.protocol.codecs``):

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

Scales are float32 (not fp16): fp16 scales would overflow for absmax > 65504 * 127 and flush small
gradients' scales to zero; the cost is 4 bytes per block (6 % of the int8 payload at block 64, so
int8 is 3.76x smaller than float32 and int4 7.1x; channel scaling adds 4 bytes a channel). Error
bounds: int8 <= absmax/254 per block, int4 <= absmax/14 (plus float32 rounding, plus the rounding
into a float16/bfloat16 declared dtype), with absmax taken in the channel-scaled domain and the
bound multiplied back by the channel's scale.

The encoder falls back to the lossless path when the tensor holds NaN/Inf.

The per-element work runs in one compiled loop each way where the optional extension ``_blockwise`` (C,
``_blockwise.c``, built by ``pip install``) is present: numpy's and torch's single operations make these codecs
some ten passes over a tensor, the loop one. It does the Python path's arithmetic in the same order and rounding,
so both give the same bits (``tests/protocol/codecs/test_blockwise_kernel.py``); without a C compiler the install
skips it and the codecs run the Python path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from shared.protocol.codecs.arrays import (as_bytes, chunk_size, flat_f32, numel, runs_inline, spans, tensor_bytes,
                                           to_torch, view_of)
from shared.protocol.codecs.entries import FLOAT_DTYPES, finish_entry, int_param, need_float, post_of, read_field, str_param
from shared.protocol.tensors import MAX_DIM, DecodeFn, EncodeFn, WireError

try:
    from shared.protocol.codecs import _blockwise as kernel
except ImportError:  # built without a C compiler: the numpy and torch path below, the same bits
    kernel = None

DEFAULT_BLOCK = 64
CHANNEL_MODES: tuple[str, ...] = ("rms",)  # on the wire; an absent "channels" means none
MIN_CHANNEL_ROWS = 64  # fewer rows: channel scales would cost over 6 % of the int8 payload; plain blocks
DEFAULT_CHANNELS = "rms"  # spec default for int8/int4; "channels=none" is plain blockwise absmax
MAX_BLOCK = MAX_DIM
_F32_MAX = float(torch.finfo(torch.float32).max)
_ROUND = 1.5 * 2**23  # |y| <= 127 plus this lies in [2**23, 2**24), where float32's step is 1: the sum is y rounded
_TINY_SQUARES = 2.0**-96  # a float32 sum of squares below this may have lost squares that underflowed: redone in float64


def _quantise(x: np.ndarray, block: int, qmax: int,
              channel_scales: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor] | None:
    """Flat float32 ``x`` (divided by ``channel_scales`` along its last dim first, where given) -> (int8 q in
    [-qmax, qmax] (n,), float32 scales (n_blocks,)); None if non-finite.

    scale = absmax / qmax of each block, q = x * (qmax / absmax) rounded to the nearest integer (ties to even).
    The compiled ``kernel``, where present, does it all in one loop. Else, where torch runs inline
    (``runs_inline``), every pass is one torch call on the whole array; otherwise whole-array numpy passes
    (single-threaded, vectorised), but the blocks' maxima: torch's row reduction on chunks below its grain
    (numpy's max over short rows is 6x slower). Any way the same bits; the last two use one float32 buffer of
    x's size (the channel-scaled values, then the scaled ones); ``x`` itself is never written. (A new buffer's
    pages are faulted in on first write; on a VM whose host takes freed pages back, that costs more than a pass
    over them, so the one-call path takes the blocks' maxima without a buffer of absolute values.)
    """
    if kernel is not None:
        q, amax = np.empty(x.size, dtype=np.int8), np.empty(-(-x.size // block), dtype=np.float32)
        width = 0 if channel_scales is None else channel_scales.size
        if not kernel.quantise(x, channel_scales, width, block, qmax, q, amax):
            return None
        return q, torch.from_numpy(amax) / qmax
    inline = runs_inline()
    xt = torch.from_numpy(x)
    if channel_scales is None:
        y = torch.empty_like(xt)
    elif inline:
        y = torch.div(xt.view(-1, channel_scales.size), torch.from_numpy(channel_scales)).view(-1)
    else:
        y = torch.from_numpy(np.divide(x.reshape(-1, channel_scales.size), channel_scales).reshape(-1))
    src = xt if channel_scales is None else y
    amax = torch.empty(-(-x.size // block), dtype=torch.float32)
    if inline:  # the larger of each block's max and -min: no buffer of |x| (fresh pages cost more than the pass)
        _per_block(lambda v, b, k: torch.maximum(torch.amax(v, dim=1), torch.amin(v, dim=1).neg_(),
                                                 out=amax[b: b + k]), src, block)
        amax.abs_()  # -0.0 for a block of zeros: 0.0, as the other path gives
    else:
        step = chunk_size(block)
        scratch = torch.empty(min(step, x.size), dtype=torch.float32)
        for s in spans(x.size, step):
            mags = torch.abs(src[s], out=scratch[: s.stop - s.start])
            _per_block(lambda v, b, k: torch.amax(v, dim=1, out=amax[b: b + k]), mags, block, s.start // block)
    if not np.isfinite(amax.numpy()).all():
        return None
    scales = amax / qmax
    inv = torch.where(amax > 0, qmax / amax, 0.0).clamp_(max=_F32_MAX)  # subnormal blocks: finite, never inf * 0
    if inline:
        _per_block(lambda v, b, k: torch.mul(src[b * block: (b + k) * block].view(v.shape), inv[b: b + k, None],
                                             out=v), y, block)
    else:
        values, inv_ = src.numpy(), inv.numpy()
        _per_block(lambda v, b, k: np.multiply(values[b * block: (b + k) * block].reshape(v.shape),
                                               inv_[b: b + k, None], out=v), y.numpy(), block)
    # |y| <= qmax: y + _ROUND is y rounded (ties to even), in bits; those bits are _ROUND's plus round(y), whose low
    # byte is 0: as an int32 cast to int8 (which keeps the low byte), they are round(y). (np.rint and torch's
    # round_ give the same; torch's is 100-300x slower on values below 1 with this machine's AVX-512 kernels.)
    rounded = y.numpy()  # numpy: single-threaded on either path
    rounded += _ROUND
    return rounded.view(np.int32).astype(np.int8), scales


def _per_block(op: Callable[[Any, int, int], object], v: Any, block: int, first: int = 0) -> None:
    """``op(rows, first block, row count)`` on flat ``v`` (numpy or torch) that starts on block ``first``'s
    boundary, as rows of one block each; a partial last block is a row of its own."""
    full = v.shape[0] // block * block
    if full:
        op(v[:full].reshape(-1, block), first, full // block)
    if full < v.shape[0]:
        op(v[full:].reshape(1, -1), first + full // block, 1)


def _channel_rms(x: np.ndarray, width: int) -> np.ndarray | None:
    """float32 root-mean-square of each of the ``width`` channels (last dim) of flat float32 ``x``; 1 where it is 0.

    The squares summed in float32; where that overflows or may have lost squares that underflowed (a channel's
    sum below ``_TINY_SQUARES``), in float64. None if ``x`` is not finite. The result is <= the channel's absmax,
    so it is finite, and x / rms stays within sqrt(rows).
    """
    rows = x.reshape(-1, width)
    squares = np.einsum("ij,ij->j", rows, rows)
    if not (np.isfinite(squares).all() and (squares >= _TINY_SQUARES).all()):
        squares = np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
    rms = np.sqrt(squares / rows.shape[0])
    if not np.isfinite(rms).all():
        return None
    out = rms.astype(np.float32)
    out[out == 0] = 1.0  # all-zero (or underflowing) channel
    return out


def _dequantise(q: np.ndarray, scales: np.ndarray, block: int, channel_scales: np.ndarray | None = None) -> np.ndarray:
    """float32 values q * scale of each element's block (times its channel's scale, where given; scales are
    validated: no overflow)."""
    if kernel is not None:
        out = np.empty(q.size, dtype=np.float32)
        kernel.dequantise(q, scales, channel_scales, 0 if channel_scales is None else channel_scales.size, block, out)
        return out
    if runs_inline():  # one torch call a pass (see ``_quantise``)
        t = view_of(q, torch.int8).to(torch.float32)  # q, the scales: read-only views on a body, only read
        st = view_of(scales, torch.float32)
        _per_block(lambda v, b, k: v.mul_(st[b: b + k, None]), t, block)
        if channel_scales is not None:
            t.view(-1, channel_scales.size).mul_(view_of(channel_scales, torch.float32))
        return t.numpy()
    out = q.astype(np.float32)
    _per_block(lambda v, b, k: np.multiply(v, scales[b: b + k, None], out=v), out, block)
    if channel_scales is not None:
        rows = out.reshape(-1, channel_scales.size)
        np.multiply(rows, channel_scales, out=rows)
    return out


def check_block(block: Any, where: str) -> int:
    if type(block) is not int:
        raise ValueError(f"{where}: block must be an int, got {type(block).__name__}")
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"{where}: block {block} out of range [1, {MAX_BLOCK}]")
    return block


def int_codec(name: str, bits: int) -> tuple[EncodeFn, DecodeFn]:
    """(encode_fn, decode_fn) of codec ``name`` quantising to ``bits`` (8 or 4) bits per value."""
    qmax = 127 if bits == 8 else 7

    def payload_len(n: int) -> int:
        return n if bits == 8 else (n + 1) // 2

    def enc(t: torch.Tensor, dtype: str, block: int = DEFAULT_BLOCK, channels: str | None = None,
            post: str | None = None) -> dict[str, Any] | None:
        check_block(block, name)
        if channels not in (None, *CHANNEL_MODES):
            raise ValueError(f"{name}: channels must be one of {', '.join(CHANNEL_MODES)}, got {channels!r}")
        if dtype not in FLOAT_DTYPES:
            return None
        x = flat_f32(t).numpy()
        width = t.shape[-1] if t.dim() >= 2 else 0
        cscales = None
        if channels == "rms" and width >= 2 and x.size >= MIN_CHANNEL_ROWS * width:
            cscales = _channel_rms(x, width)
            if cscales is None:
                return None  # NaN/Inf: send losslessly
        res = _quantise(x, block, qmax, cscales)
        if res is None:
            return None  # NaN/Inf: send losslessly
        q, scales = res
        if bits == 8:
            data = as_bytes(q)
        else:
            nib = (q + 7).view(np.uint8)  # nibbles 0..14
            if nib.size % 2:
                nib = np.concatenate([nib, np.zeros(1, dtype=np.uint8)])
            packed = nib[1::2] << 4
            packed |= nib[0::2]
            data = as_bytes(packed)
        fields_ = {"scales": (tensor_bytes(scales), 4), "data": (data, 1)}
        params: dict[str, Any] = {"block": block}
        if cscales is not None:
            fields_["channel_scales"] = (as_bytes(cscales.astype("<f4", copy=False)), 4)
            params["channels"] = channels
        return finish_entry(fields_, post, params)

    def dec(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        need_float(dtype, name)
        block = int_param(entry, "block", name, 1, MAX_BLOCK)
        post = post_of(entry)
        n = numel(shape)
        nb = -(-n // block)
        sraw = read_field(
            entry, "scales", 4 * nb, 4, post, f"{name} scales",
            f"shape {list(shape)} in {nb} block(s) of {block}",
        )
        draw = read_field(entry, "data", payload_len(n), 1, post, f"{name} payload", f"shape {list(shape)}")
        scales = np.frombuffer(sraw, dtype="<f4")
        if nb and not ((scales >= 0).all() and (scales <= _F32_MAX / qmax).all()):  # NaN fails both
            raise WireError(f"{name} scales must be finite, >= 0 and <= {_F32_MAX / qmax:.4g}")
        cscales = None
        if "channels" in entry:
            str_param(entry, "channels", name, dict.fromkeys(CHANNEL_MODES))
            if len(shape) < 2 or shape[-1] < 2:
                raise WireError(f"{name} channels need a tensor of 2+ dims with 2+ channels, got shape {list(shape)}")
            width = shape[-1]
            craw = read_field(entry, "channel_scales", 4 * width, 4, post, f"{name} channel_scales",
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
        out = to_torch(_dequantise(q, scales.astype(np.float32, copy=False), block,
                                   None if cscales is None else cscales.astype(np.float32, copy=False)), dtype)
        return out.reshape(shape)

    return enc, dec
