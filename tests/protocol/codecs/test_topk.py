"""The topk codec (shared.protocol.codecs.topk): selection, index dtypes, k, refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from shared.protocol.codecs import index_dtype_for, resolve_k, topk_dense
from shared.protocol.wire import Message, WireError, decode, encode

from codec_helpers import DROP, entry_of, refused, repack, roundtrip, sample

# ----------------------------------------------------------------------------------- round trips


def test_topk_keeps_exactly_the_k_largest() -> None:
    x = sample([8, 16], torch.float32, 5, distinct=True)
    out, e, _ = roundtrip(x, "topk:k=10")
    keep = x.abs().reshape(-1).topk(10).indices
    expect = torch.zeros(128)
    expect[keep] = x.reshape(-1)[keep]
    assert torch.equal(out.reshape(-1), expect)
    assert e["k"] == 10 and e["index_dtype"] == "uint8" and e["value_dtype"] == "float32"
    idx = np.frombuffer(e["indices"], "u1")
    assert (np.diff(idx.astype(int)) > 0).all()
    # ratio resolves at encode time; k larger than numel is clamped by the encoder
    assert roundtrip(x, "topk:ratio=0.01")[1]["k"] == 2
    out, e, _ = roundtrip(x, "topk:k=1000")
    assert e["k"] == 128 and torch.equal(out, x)


def test_index_dtype_is_smallest_sufficient() -> None:
    assert [index_dtype_for(n) for n in (0, 1, 256, 257, 65536, 65537, 2**32, 2**32 + 1)] == [
        "uint8", "uint8", "uint8", "uint16", "uint16", "uint32", "uint32", "uint64",
    ]
    x = torch.zeros(300)
    x[299] = 5.0
    out, e, _ = roundtrip(x, "topk:k=1")
    assert e["index_dtype"] == "uint16" and np.frombuffer(e["indices"], "<u2").tolist() == [299]
    assert out[299] == 5.0


def test_resolve_k() -> None:
    assert resolve_k(1000, ratio=0.01) == 10
    assert resolve_k(10, ratio=0.01) == 1
    assert resolve_k(0, ratio=0.5) == 0
    assert resolve_k(5, k=9) == 5
    for bad in ({}, {"k": 1, "ratio": 0.5}, {"ratio": 0.0}, {"ratio": 1.5}, {"k": -1}, {"k": 1.0}):
        with pytest.raises(ValueError):
            resolve_k(10, **bad)


# ----------------------------------------------------------------------------------- refusals


def test_refuse_topk_inconsistencies() -> None:
    x = sample([10, 30], torch.float32, 2)
    data = encode(Message("k", tensors={"g": x}), tensor_codecs={"g": "topk:k=20"})
    e = entry_of(data, "g")
    assert e["index_dtype"] == "uint16" and len(e["indices"]) == 40

    def bad(match: str, **ch: Any) -> WireError:
        return refused(repack(data, "g", **ch), match)

    bad(r"topk k=301 out of range for shape \[10, 30\] \(300 elements\)", k=301)
    bad("topk k=-1 out of range", k=-1)
    bad("topk entry needs an int 'k', got float", k=20.0)
    bad("topk indices have 40 bytes, k=21 uint16 needs 42", k=21)
    bad("topk indices have 38 bytes", indices=e["indices"][:-2])
    bad("topk values have 76 bytes, k=20 float32 needs 80", data=e["data"][:-4])
    idx = np.frombuffer(e["indices"], "<u2").copy()
    i2 = idx.copy()
    i2[-1] = 300
    bad(r"topk index 300 out of range for shape \[10, 30\] \(300 elements\)", indices=i2.tobytes())
    i2 = idx.copy()
    i2[-1] = 65535
    bad("topk index 65535 out of range", indices=i2.tobytes())
    i2 = idx.copy()
    i2[3] = i2[4]
    bad("topk indices must be strictly increasing", indices=i2.tobytes())
    bad("topk index_dtype 'int16' unknown \\(known: uint8, uint16, uint32, uint64\\)", index_dtype="int16")
    bad("topk index_dtype 'uint32' for 300 elements must be 'uint16'", index_dtype="uint32", indices=idx.astype("<u4").tobytes())
    bad("topk entry needs a str 'index_dtype', got int", index_dtype=2)
    bad("topk value_dtype 'float64' unknown", value_dtype="float64")
    bad("topk entry needs a str 'value_dtype', got NoneType", value_dtype=DROP)
    bad("unknown post-processing 'shuffle'", post="shuffle")
    bad("topk codec needs a floating dtype, got 'int64'", dtype="int64", data=bytes(2400))
    assert torch.equal(decode(data).tensors["g"], topk_dense(x, 20))
