"""Shared helpers of the lossy codec tests: sample tensors, round trips, documented error bounds, entry surgery."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, settings

from shared.protocol.codecs import CodecSpec, resolve_k
from shared.protocol.wire import Message, WireError, decode, encode

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# relative rounding error (half an ulp) of casting to each dtype, and the absolute error in its subnormal range
REL_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 0.0}
ABS_EPS = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float64: 0.0}
SHAPES = [[], [0], [3, 0], [1], [5], [63], [64], [65], [130], [3, 7], [4, 32], [2, 3, 5, 7], [1, 2, 3, 11]]
LOSSY = [
    "fp16",
    "bf16",
    "int8",
    "int8:block=7",
    "int4",
    "int4:block=5",
    "topk:k=3",
    "topk:ratio=0.3",
    "topk:ratio=0.5,values=fp16",
    "fp16+shuffle-lz4",
    "bf16+shuffle-lz4",
    "int8:block=16+shuffle-lz4",
    "int4+shuffle-lz4",
    "topk:ratio=0.25+shuffle-lz4",
]


def entry_of(data: bytes, name: str = "x") -> dict[str, Any]:
    return msgpack.unpackb(data)["tensors"][name]


def repack(buf: bytes, name: str = "x", /, **changes: Any) -> bytes:
    doc = msgpack.unpackb(buf)
    e = doc["tensors"][name]
    for k, v in changes.items():
        if v is DROP:
            e.pop(k, None)
        else:
            e[k] = v
    return msgpack.packb(doc, use_bin_type=True)


DROP = object()


def refused(data: bytes, match: str) -> WireError:
    with pytest.raises(WireError, match=match) as ei:
        decode(data)
    assert ei.value.reason == str(ei.value) and "\n" not in ei.value.reason
    return ei.value


def sample(shape: list[int], dtype: torch.dtype, seed: int = 0, distinct: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if distinct:  # distinct magnitudes (exact in every float dtype for n <= 256): top-k is unambiguous
        mags = torch.randperm(n, generator=g).to(torch.float64) + 1
        signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        return (mags * signs).reshape(shape).to(dtype)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 2
    if n > 4:
        x[torch.randint(0, n, (max(1, n // 50),), generator=g)] *= 30  # a few outliers
    return x.reshape(shape).to(dtype)


def roundtrip(t: torch.Tensor, spec: str | CodecSpec, name: str = "x") -> tuple[torch.Tensor, dict[str, Any], bytes]:
    data = encode(Message("k", tensors={name: t}), tensor_codecs={name: spec})
    out = decode(data).tensors[name]
    assert out.dtype == t.dtype and out.shape == t.shape
    return out, entry_of(data, name), data


def check_bounds(spec: CodecSpec, x: torch.Tensor, out: torch.Tensor, e: dict[str, Any]) -> None:
    """The documented error bound of ``spec`` for input ``x`` decoded as ``out``."""
    ref = x.to(torch.float64).reshape(-1)
    got = out.to(torch.float64).reshape(-1)
    n = ref.numel()
    err = (got - ref).abs()
    rel, tiny = REL_EPS[x.dtype], ABS_EPS[x.dtype]
    if spec.name in ("int8", "int4"):
        assert e["codec"] == spec.name
        block = spec.params.get("block", 64)
        qmax = 127 if spec.name == "int8" else 7
        nb = -(-n // block)
        scale = torch.ones(n, dtype=torch.float64)  # channel scales: the bound holds in the equalised domain
        if e.get("channels") == "rms":
            width = x.shape[-1]
            rms = ref.view(-1, width).pow(2).mean(0).sqrt().to(torch.float32).to(torch.float64)
            scale = torch.where(rms > 0, rms, 1.0).repeat(n // width)
        else:
            assert "channels" not in e and "channel_scales" not in e
        padded = torch.zeros(nb * block, dtype=torch.float64)
        padded[:n] = ref.abs() / scale
        amax = padded.view(nb, block).amax(1).repeat_interleave(block)[:n]
        # half a quantisation step, plus float32 arithmetic, plus rounding into the output dtype
        bound = (amax / (2 * qmax) * (1 + 1e-5) + amax * 3e-7) * scale + (amax * scale) * rel + tiny + 1e-37
        assert bool((err <= bound).all()), float((err - bound).max())
    elif spec.name in ("fp16", "bf16"):
        assert e["codec"] == spec.name
        wire = torch.float16 if spec.name == "fp16" else torch.bfloat16
        bound = ref.abs() * (REL_EPS[wire] + rel) + ABS_EPS[wire] + tiny
        assert bool((err <= bound).all())
    elif spec.name == "topk":
        assert e["codec"] == "topk"
        k = resolve_k(n, spec.params.get("k"), spec.params.get("ratio"))
        assert e["k"] == k
        kept = torch.topk(ref.abs(), k).indices if k else torch.empty(0, dtype=torch.int64)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[kept] = True
        assert bool((got[~mask] == 0).all())
        vrel = REL_EPS[torch.float16] if spec.params.get("values") == "fp16" else 0.0
        assert bool((err[mask] <= ref.abs()[mask] * (vrel + rel) + 1e-7 * vrel).all())
        assert int((got != 0).sum()) == int((ref[mask] != 0).sum())
