"""Lossy tensor codecs for the wire: fp16, bf16, int8, int4, top-k (+ optional shuffle-lz4), registered on import.

Importing ``shared.protocol.wire`` registers them (it imports this package), so any receiver decodes them.

Entry layouts
-------------
Every entry keeps the ORIGINAL tensor's ``"dtype"`` and ``"shape"``; the decoder reconstructs exactly
that dtype and shape from the entry alone. These codecs apply to floating dtypes only (float32,
float16, bfloat16, float64); an entry with another dtype is refused. Multi-byte numbers are
little-endian. ``n`` = prod(shape) (1 for a 0-d tensor), blocks run over the flattened C-order
tensor, ``n_blocks = ceil(n / block)`` and the last block may be partial.

Each codec's fields are documented in the module that implements it: ``halves`` ("fp16", "bf16"),
``blockwise`` ("int8", "int4", channel scaling, scales and error bounds), ``topk`` ("topk"); the
optional ``"post": "shuffle-lz4"`` in ``entries``; the spec syntax (``CodecSpec``) in ``spec``.

Encoders fall back to the lossless path (lz4, else raw) where the lossy one cannot represent the
tensor: int8/int4 when it holds NaN/Inf, fp16/bf16 when a finite value would overflow. topk
carries NaN/Inf as values, and switches fp16 values to float32 when they would overflow.
"""

from __future__ import annotations

from shared.protocol.codecs.blockwise import (CHANNEL_MODES, DEFAULT_BLOCK, DEFAULT_CHANNELS, MAX_BLOCK, MIN_CHANNEL_ROWS,
                                              int_codec)
from shared.protocol.codecs.entries import FLOAT_DTYPES, POSTS, SHUFFLE_LZ4
from shared.protocol.codecs.halves import half_codec
from shared.protocol.codecs.policy import CodecPolicy, ErrorFeedback
from shared.protocol.codecs.spec import KNOWN_CODECS, CodecSpec
from shared.protocol.codecs.topk import index_dtype_for, resolve_k, topk_decode, topk_dense, topk_encode
from shared.protocol.tensors import register_codec

__all__ = [
    "CHANNEL_MODES",
    "DEFAULT_BLOCK",
    "DEFAULT_CHANNELS",
    "FLOAT_DTYPES",
    "KNOWN_CODECS",
    "MAX_BLOCK",
    "MIN_CHANNEL_ROWS",
    "POSTS",
    "SHUFFLE_LZ4",
    "CodecPolicy",
    "CodecSpec",
    "ErrorFeedback",
    "index_dtype_for",
    "resolve_k",
    "topk_dense",
]


def _register() -> None:
    wire = {
        "fp16": half_codec("fp16", "float16"),
        "bf16": half_codec("bf16", "bfloat16"),
        "int8": int_codec("int8", 8),
        "int4": int_codec("int4", 4),
        "topk": (topk_encode, topk_decode),
    }
    for name, (enc, dec) in wire.items():
        register_codec(name, enc, dec, replace=True)  # replace: tolerate a module reload


_register()
