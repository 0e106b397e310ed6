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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from shared.protocol.codecs.arrays import as_bytes, chunk_size, flat_f32, numel, spans, tensor_bytes, to_torch, view_of
from shared.protocol.codecs.entries import FLOAT_DTYPES, finish_entry, int_param, need_float, post_of, read_field, str_param
from shared.protocol.tensors import MAX_DIM, DecodeFn, EncodeFn, WireError

DEFAULT_BLOCK = 64
CHANNEL_MODES: tuple[str, ...] = ("rms",)  # on the wire; an absent "channels" means none
MIN_CHANNEL_ROWS = 64  # fewer rows: channel scales would cost over 6 % of the int8 payload; plain blocks
DEFAULT_CHANNELS = "rms"  # spec default for int8/int4; "channels=none" is plain blockwise absmax
MAX_BLOCK = MAX_DIM
_F32_MAX = float(torch.finfo(torch.float32).max)
_ROUND = 1.5 * 2**23  # |y| <= 127 plus this lies in [2**23, 2**24), where float32's step is 1: the sum is y rounded


def _block_rows(v: torch.Tensor, block: int) -> Iterator[torch.Tensor]:
    """A flat chunk that starts on a block boundary as rows of one block each; a partial last block is a row of its own."""
    full = v.numel() // block * block
    if full:
        yield v[:full].view(-1, block)
    if full < v.numel():
        yield v[full:].view(1, -1)


def _quantise(x: torch.Tensor, block: int, qmax: int,
              channel_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat float32 ``x`` (divided by ``channel_scales`` along its last dim first, where given) -> (int8 q in
    [-qmax, qmax] (n,), float32 scales (n_blocks,)); None if non-finite.

    scale = absmax / qmax of each block, q = x * (qmax / absmax) rounded to the nearest integer (ties to even).
    Two passes over chunks below torch's grain, each starting on a block (and row) boundary, through one
    scratch buffer: the blocks' absmax, then the rounding; ``x`` itself is never written.
    """
    n = x.numel()
    width = 1 if channel_scales is None else channel_scales.numel()
    step = chunk_size(math.lcm(block, width))
    scratch = torch.empty(min(step, n), dtype=torch.float32)

    def chunks() -> Iterator[tuple[int, torch.Tensor]]:  # (first block, scratch holding the chunk's values)
        for s in spans(n, step):
            part = scratch[: s.stop - s.start]
            if channel_scales is None:
                part.copy_(x[s])
            else:
                torch.div(x[s].view(-1, width), channel_scales, out=part.view(-1, width))
            yield s.start // block, part

    amax = torch.empty(-(-n // block), dtype=torch.float32)
    for b, part in chunks():
        for rows in _block_rows(part.abs_(), block):
            torch.amax(rows, dim=1, out=amax[b: b + rows.shape[0]])
            b += rows.shape[0]
    if not np.isfinite(amax.numpy()).all():
        return None
    scales = amax / qmax
    inv = torch.where(amax > 0, qmax / amax, 0.0).clamp_(max=_F32_MAX)  # subnormal blocks: finite, never inf * 0
    q = torch.empty(n, dtype=torch.int8)
    for b, part in chunks():
        start = b * block
        for rows in _block_rows(part, block):
            rows.mul_(inv[b: b + rows.shape[0], None]).add_(_ROUND)  # |y| <= qmax: y + _ROUND is y rounded, in bits
            b += rows.shape[0]
        # (y + _ROUND)'s bits are _ROUND's plus round(y), whose low byte is 0: as an int32 cast to int8 (which keeps
        # the low byte), they are round(y)
        q[start: start + part.numel()].copy_(part.view(torch.int32))
    return q, scales


def _channel_rms(x: torch.Tensor, width: int) -> torch.Tensor | None:
    """float32 root-mean-square of each of the ``width`` channels (last dim) of flat ``x``; 1 where it is 0.

    Summed in float64 (squares of large float32 values overflow float32); None if ``x`` is not finite.
    The result is <= the channel's absmax, so it is finite, and x / rms stays within sqrt(rows).
    """
    rows = x.view(-1, width)
    squares = torch.zeros(width, dtype=torch.float64)
    for s in _row_chunks(rows.shape[0], width):
        squares += rows[s].double().square_().sum(0)
    rms = (squares / rows.shape[0]).sqrt_()
    if not torch.isfinite(rms).all():
        return None
    out = rms.float()
    out[out == 0] = 1.0  # all-zero (or underflowing) channel
    return out


def _row_chunks(rows: int, width: int) -> Iterator[slice]:
    """Slices of whole rows, each chunk below torch's grain where a row is."""
    return spans(rows, max(1, chunk_size(width) // width))


def _dequantise(q: torch.Tensor, scales: torch.Tensor, block: int, n: int,
                channel_scales: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values q * scale of each element's block (times its channel's scale, where given; scales are
    validated: no overflow)."""
    out = torch.empty(n, dtype=torch.float32)
    width = 1 if channel_scales is None else channel_scales.numel()
    for s in spans(n, chunk_size(math.lcm(block, width))):
        b, start = s.start // block, s.start
        for rows in _block_rows(q[s], block):
            k = rows.shape[0]
            torch.mul(rows, scales[b: b + k, None], out=out[start: start + rows.numel()].view_as(rows))
            b, start = b + k, start + rows.numel()
        if channel_scales is not None:
            out[s].view(-1, width).mul_(channel_scales)
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
        x = flat_f32(t)
        width = t.shape[-1] if t.dim() >= 2 else 0
        cscales = None
        if channels == "rms" and width >= 2 and x.numel() >= MIN_CHANNEL_ROWS * width:
            cscales = _channel_rms(x, width)
            if cscales is None:
                return None  # NaN/Inf: send losslessly
        res = _quantise(x, block, qmax, cscales)
        if res is None:
            return None  # NaN/Inf: send losslessly
        q, scales = res
        if bits == 8:
            data = tensor_bytes(q)
        else:
            nib = (q.numpy() + 7).view(np.uint8)  # nibbles 0..14
            if nib.size % 2:
                nib = np.concatenate([nib, np.zeros(1, dtype=np.uint8)])
            packed = nib[1::2] << 4
            packed |= nib[0::2]
            data = as_bytes(packed)
        fields_ = {"scales": (tensor_bytes(scales), 4), "data": (data, 1)}
        params: dict[str, Any] = {"block": block}
        if cscales is not None:
            fields_["channel_scales"] = (tensor_bytes(cscales), 4)
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
            q = view_of(draw, torch.int8)
            bad = n and int(np.frombuffer(draw, dtype=np.int8).min()) < -qmax  # only -128 is out of range
        else:
            packed = np.frombuffer(draw, dtype=np.uint8)
            if n % 2 and packed[-1] >> 4:
                raise WireError(f"{name} padding nibble must be 0 (odd element count {n})")
            nib = np.empty(2 * packed.size, dtype=np.uint8)
            np.bitwise_and(packed, 15, out=nib[0::2])
            np.right_shift(packed, 4, out=nib[1::2])
            q = nib.view(np.int8)
            q -= 7  # nibble 15 (invalid) -> 8
            bad = n and int(q[:n].max()) > qmax  # values are -7..8 here
            q = torch.from_numpy(q[:n])
        if bad:
            raise WireError(f"{name} payload holds a value outside [-{qmax}, {qmax}]")
        out = _dequantise(q, torch.from_numpy(scales.astype(np.float32)), block, n,
                          None if cscales is None else torch.from_numpy(cscales.astype(np.float32)))
        return (out if dtype == "float32" else to_torch(out.numpy(), dtype)).reshape(shape)

    return enc, dec
