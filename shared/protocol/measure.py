"""Bytes, ratio, speed and error of one codec spec on one tensor, measured through the wire encode/decode."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import torch

from shared.protocol.codecs import CodecSpec
from shared.protocol.wire import DEFAULT_MAX_MESSAGE_BYTES, Message, decode, encode


def measure(spec: str | CodecSpec, tensor: torch.Tensor, repeats: int = 5) -> dict[str, Any]:
    """Bytes, ratio and speed of sending ``tensor`` as one message with codec ``spec``.

    ``bytes`` is the whole encoded message; ``ratio_vs_fp32`` = numel * 4 / bytes;
    ``encode_decode_mb_s`` = fp32 MB (1e6 bytes) of input per second of encode + decode, best of
    ``repeats`` (``encode_decode_mb_s_median``: the median of them); ``encode_decode_cpu_mb_s`` the same per
    second of this thread's CPU time (the codecs run on the calling thread), which other jobs on the machine
    change far less; errors are of the decoded tensor against the input, in float64.
    """
    cs = CodecSpec.parse(spec)
    t = tensor.detach().cpu().contiguous()
    msg = Message("measure", tensors={"x": t})
    limit = max(DEFAULT_MAX_MESSAGE_BYTES, 4 * t.numel() * t.element_size() + (1 << 20))
    walls, cpus = [], []
    data, out = b"", t
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.thread_time()
        data = encode(msg, tensor_codecs={"x": cs})
        out = decode(data, max_bytes=limit).tensors["x"]
        walls.append(time.perf_counter() - t0)
        cpus.append(time.thread_time() - c0)
    best, best_cpu, median = min(walls), min(cpus), statistics.median(walls)
    ref = t.to(torch.float64)
    diff = out.to(torch.float64) - ref
    norm = float(ref.norm()) if ref.numel() else 0.0
    fp32_bytes = t.numel() * 4
    return {
        "codec": str(cs),
        "bytes": len(data),
        "ratio_vs_fp32": fp32_bytes / len(data),
        "encode_decode_mb_s": fp32_bytes / 1e6 / best if best > 0 else math.inf,
        "encode_decode_mb_s_median": fp32_bytes / 1e6 / median if median > 0 else math.inf,
        "encode_decode_cpu_mb_s": fp32_bytes / 1e6 / best_cpu if best_cpu > 0 else math.inf,
        "max_abs_err": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_err": float(diff.norm()) / norm if norm else float(diff.norm()),
    }


CACHED_BYTES = 512 * 1024  # a piece this size, with its output, stays in one core's L2 cache on current x86 servers


def memory_passes(tensor: torch.Tensor, repeats: int = 20) -> dict[str, Any]:
    """What one pass over ``tensor``'s bytes costs on this machine: the floor under every codec.

    A codec is a chain of such passes (a cast, a check, the wire's copy of the payload, ...), each one numpy's or
    torch's single-threaded vectorised loop. Two passes, each timed over the whole float32 tensor (as a codec
    makes them, from and to main memory or the last-level cache) and over its first ``CACHED_BYTES`` (repeated,
    so from and to the core's own cache): a copy into a second buffer (``np.copyto``) and a multiplication by a
    scalar into it (``np.multiply``). GB per second of the tensor's bytes read, best of ``repeats``.
    """
    src = tensor.detach().cpu().reshape(-1).float().contiguous().numpy()
    dst = np.empty_like(src)
    out: dict[str, Any] = {"bytes": int(src.nbytes), "cached_bytes": min(int(src.nbytes), CACHED_BYTES)}
    n_cached = out["cached_bytes"] // 4
    ops = {"copy": lambda a, b: np.copyto(b, a), "multiply": lambda a, b: np.multiply(a, np.float32(0.5), out=b)}
    for name, op in ops.items():
        for where, a, b in (("whole", src, dst), ("cached", src[:n_cached], dst[:n_cached])):
            reps = max(1, src.size // max(1, a.size))  # the cached piece: as many times as make one whole pass
            op(a, b)
            best = math.inf
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                for _ in range(reps):
                    op(a, b)
                best = min(best, (time.perf_counter() - t0) / reps)
            out[f"{name}_{where}_gb_s"] = a.nbytes / 1e9 / best if best > 0 else math.inf
    return out
