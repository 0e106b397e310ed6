"""Entry fields of the lossy codecs: the optional shuffle-lz4 post-processing and param validation.

Optional ``"post": "shuffle-lz4"``: every bin field of a lossy entry (``data``, ``scales``,
``channel_scales``, ``indices``) is byte-shuffled by its element size (byte j of every element
together, lane after lane) and then LZ4-block compressed (no size prefix). The uncompressed length
of every field is implied by shape and params, so decompression is bounded by it and must give
exactly that many bytes. An absent ``post`` means none; any other value is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lz4.block

from shared.protocol.codecs.arrays import shuffle, unshuffle
from shared.protocol.tensors import WireError, bin_field, bounded_repr, shorten

SHUFFLE_LZ4 = "shuffle-lz4"
POSTS: tuple[str, ...] = (SHUFFLE_LZ4,)
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


def finish_entry(fields_: dict[str, tuple[memoryview, int]], post: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """Entry fields from the bin fields (buffer, element size) and scalar params, applying ``post``."""
    out = dict(params)
    if post == SHUFFLE_LZ4:
        packed = {k: lz4.block.compress(shuffle(buf, isz), store_size=False) for k, (buf, isz) in fields_.items()}
        if sum(map(len, packed.values())) < sum(buf.nbytes for buf, _ in fields_.values()):
            out.update(packed)
            out["post"] = SHUFFLE_LZ4
            return out
    elif post is not None:
        raise ValueError(f"unknown post-processing {post!r} (known: {', '.join(POSTS)})")
    out.update({k: buf for k, (buf, _) in fields_.items()})
    return out


def post_of(entry: dict[str, Any]) -> str | None:
    """The entry's post-processing (None when absent); WireError if it is not one of ``POSTS``."""
    if "post" not in entry:
        return None
    post = entry["post"]
    if post not in POSTS:  # also refuses non-str values
        raise WireError(f"unknown post-processing {bounded_repr(post)} (known: {', '.join(POSTS)})")
    return post


def _has(what: str, plural: str = "have", singular: str = "has") -> str:
    return plural if what.endswith("s") else singular


def read_field(entry: dict[str, Any], key: str, need: int, itemsize: int, post: str | None, what: str, why: str) -> bytes:
    """The uncompressed bytes of bin field ``key``: exactly ``need`` of them, or WireError."""
    data = bin_field(entry, key)
    if post is None:
        if len(data) != need:
            raise WireError(f"{what} {_has(what)} {len(data)} bytes, {why} needs {need}")
        return data
    try:
        raw = lz4.block.decompress(data, uncompressed_size=need)  # bounded by the implied size
    except Exception as e:
        raise WireError(f"corrupt lz4 block in {what}: {shorten(str(e), 120)}") from None
    if len(raw) != need:
        raise WireError(f"{what} {_has(what, 'decompress', 'decompresses')} to {len(raw)} bytes, {why} needs {need}")
    return unshuffle(raw, itemsize)


def need_float(dtype: str, codec: str) -> None:
    """WireError unless the entry's declared ``dtype`` is a floating one."""
    if dtype not in FLOAT_DTYPES:
        raise WireError(f"{codec} codec needs a floating dtype, got {bounded_repr(dtype)}")


def int_param(entry: dict[str, Any], key: str, codec: str, lo: int, hi: int) -> int:
    """The int field ``key`` of a ``codec`` entry, in [lo, hi]; WireError otherwise."""
    v = entry.get(key)
    if type(v) is not int:
        raise WireError(f"{codec} entry needs an int {key!r}, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise WireError(f"{codec} {key} {v} out of range [{lo}, {hi}]")
    return v


def str_param(entry: dict[str, Any], key: str, codec: str, known: Mapping[str, Any]) -> str:
    """The str field ``key`` of a ``codec`` entry, one of ``known``; WireError otherwise."""
    v = entry.get(key)
    if not isinstance(v, str):
        raise WireError(f"{codec} entry needs a str {key!r}, got {type(v).__name__}")
    if v not in known:
        raise WireError(f"{codec} {key} {bounded_repr(v)} unknown (known: {', '.join(known)})")
    return v
