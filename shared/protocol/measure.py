"""Bytes, ratio, speed and error of one codec spec on one tensor, measured through the wire encode/decode."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from shared.protocol.codecs import CodecSpec
from shared.protocol.wire import DEFAULT_MAX_MESSAGE_BYTES, Message, decode, encode


def measure(spec: str | CodecSpec, tensor: torch.Tensor, repeats: int = 5) -> dict[str, Any]:
    """Bytes, ratio and speed of sending ``tensor`` as one message with codec ``spec``.

    ``bytes`` is the whole encoded message; ``ratio_vs_fp32`` = numel * 4 / bytes;
    ``encode_decode_mb_s`` = fp32 MB (1e6 bytes) of input per second of encode + decode, best of
    ``repeats``; ``encode_decode_cpu_mb_s`` the same per second of this thread's CPU time (the codecs run
    on the calling thread), which other jobs on the machine change far less; errors are of the decoded
    tensor against the input, in float64.
    """
    cs = CodecSpec.parse(spec)
    t = tensor.detach().cpu().contiguous()
    msg = Message("measure", tensors={"x": t})
    limit = max(DEFAULT_MAX_MESSAGE_BYTES, 4 * t.numel() * t.element_size() + (1 << 20))
    best = best_cpu = math.inf
    data, out = b"", t
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.thread_time()
        data = encode(msg, tensor_codecs={"x": cs})
        out = decode(data, max_bytes=limit).tensors["x"]
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.thread_time() - c0)
    ref = t.to(torch.float64)
    diff = out.to(torch.float64) - ref
    norm = float(ref.norm()) if ref.numel() else 0.0
    fp32_bytes = t.numel() * 4
    return {
        "codec": str(cs),
        "bytes": len(data),
        "ratio_vs_fp32": fp32_bytes / len(data),
        "encode_decode_mb_s": fp32_bytes / 1e6 / best if best > 0 else math.inf,
        "encode_decode_cpu_mb_s": fp32_bytes / 1e6 / best_cpu if best_cpu > 0 else math.inf,
        "max_abs_err": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_err": float(diff.norm()) / norm if norm else float(diff.norm()),
    }
