"""Fuzzing lossy entries: mutated bytes and fields decode or raise WireError, nothing else."""

from __future__ import annotations

from typing import Any

import msgpack
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol.wire import Message, WireError, decode, encode

from codec_helpers import DROP, repack, sample

_MUTATION_SAMPLES = [
    encode(
        Message(
            "bwd",
            tensors={
                "h": sample([3, 5, 67], torch.float32, 7),
                "g": sample([4, 80], torch.bfloat16, 8),
                "m": torch.arange(70) % 2 == 0,
            },
        ),
        tensor_codecs={"h": h, "g": g, "m": "int8"},
    )
    for h, g in (
        ("int8", "topk:ratio=0.1"),
        ("int4:block=16", "topk:k=30,values=fp16"),
        ("int8:block=32+shuffle-lz4", "topk:ratio=0.2+shuffle-lz4"),
        ("bf16+shuffle-lz4", "fp16"),
    )
]


def _ok_or_wire_error(data: bytes) -> None:
    try:
        out = decode(data)
    except WireError as e:
        assert e.reason and "\n" not in e.reason
        return
    assert isinstance(out, Message)
    for t in out.tensors.values():
        assert isinstance(t, torch.Tensor)


@settings(max_examples=250, deadline=None)
@given(
    which=st.integers(0, len(_MUTATION_SAMPLES) - 1),
    edits=st.lists(
        st.tuples(st.integers(0, 100_000), st.integers(0, 255), st.sampled_from(["set", "xor", "del", "ins"])),
        min_size=1,
        max_size=4,
    ),
    cut=st.none() | st.integers(0, 100_000),
)
def test_fuzz_byte_mutations(which: int, edits: list[tuple[int, int, str]], cut: int | None) -> None:
    buf = bytearray(_MUTATION_SAMPLES[which])
    for pos, val, op in edits:
        i = pos % (len(buf) or 1)
        if op == "set" and buf:
            buf[i] = val
        elif op == "xor" and buf:
            buf[i] ^= 1 << (val % 8)
        elif op == "del" and buf:
            del buf[i]
        elif op == "ins":
            buf.insert(i, val)
    if cut is not None:
        del buf[cut % (len(buf) + 1) :]
    _ok_or_wire_error(bytes(buf))


_FIELD_VALUES = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.integers(-3, 400),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.sampled_from(["shuffle-lz4", "uint8", "uint16", "uint64", "float16", "float32", "bfloat16", "int8"]),
    st.binary(max_size=64),
    st.lists(st.integers(0, 9), max_size=4),
)


@settings(max_examples=250, deadline=None)
@given(
    which=st.integers(0, len(_MUTATION_SAMPLES) - 1),
    name=st.sampled_from(["h", "g", "m"]),
    changes=st.dictionaries(
        st.sampled_from(["block", "scales", "data", "k", "indices", "index_dtype", "value_dtype", "post", "shape", "dtype", "codec"]),
        _FIELD_VALUES | st.just(DROP),
        min_size=1,
        max_size=3,
    ),
    slice_=st.none() | st.tuples(st.sampled_from(["data", "scales", "indices"]), st.integers(-8, 8)),
)
def test_fuzz_field_mutations(which: int, name: str, changes: dict[str, Any], slice_: tuple[str, int] | None) -> None:
    data = _MUTATION_SAMPLES[which]
    doc = msgpack.unpackb(data)
    e = doc["tensors"][name]
    if slice_ is not None and isinstance(e.get(slice_[0]), bytes):
        key, d = slice_
        changes.setdefault(key, e[key][:d] if d < 0 else e[key] + bytes(d))
    _ok_or_wire_error(repack(data, name, **changes))
