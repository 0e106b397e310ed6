"""Decoding a message where it was read (shared.protocol.inplace): large tensors are aligned, writable views on the
buffer, nothing is copied whole, and every input decodes to the same message, or fails with the same error, as
the ordinary decode of its bytes."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol import inplace
from shared.protocol.inplace import ALIGN, BULK_EXT, MessageBuffer, bulk_bins
from shared.protocol.wire import Message, WireError, decode, encode


def buffer_of(data: bytes, chunk: int = 4096) -> MessageBuffer:
    buf = MessageBuffer(len(data))
    for i in range(0, len(data), chunk):
        buf.write(data[i:i + chunk])
    return buf


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, to compare tensors bit for bit."""
    return t.contiguous().view(-1).view(torch.uint8)


def outcome(data: bytes | MessageBuffer, **kw: Any) -> Any:
    """What decode makes of ``data``: (kind, meta, {name: (dtype, shape, bytes)}), or the error's reason."""
    try:
        msg = decode(data, **kw)
    except WireError as e:
        return e.reason
    return msg.kind, msg.meta, {k: (t.dtype, tuple(t.shape), raw(t).tolist()) for k, t in msg.tensors.items()}


def step(rows: int = 1024, width: int = 32) -> bytes:
    g = torch.Generator().manual_seed(0)
    return encode(Message("step", meta={"round": 1, "user": "u", "blob": b"x" * 100_000},
                          tensors={"hidden": torch.randn(rows, width, generator=g),
                                   "grad": torch.randn(rows + 3, width, generator=g).to(torch.bfloat16),
                                   "attention_mask": torch.ones(4, rows // 4, dtype=torch.uint8),
                                   "labels": torch.arange(4)}), codec="raw")


def test_large_tensors_are_aligned_writable_views_and_nothing_is_copied_whole() -> None:
    data = step(rows=8192)  # hidden 1 MiB, grad 0.5 MiB: both above BULK_MIN
    buf = buffer_of(data)
    tracemalloc.start()
    try:
        msg = decode(buf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # what remains is the small rest: meta's 100 kB blob (in the skeleton, then as bytes), the mask, the labels
    assert peak < len(data) / 5, f"decoding in place allocated {peak} bytes for a {len(data)}-byte body"
    expected = decode(data)
    for name in ("hidden", "grad"):
        assert msg.tensors[name].data_ptr() % ALIGN == 0
        assert torch.equal(raw(msg.tensors[name]), raw(expected.tensors[name]))
    before = raw(msg.tensors["grad"]).clone()
    msg.tensors["hidden"].fill_(7.0)  # writable, and its own: the other tensor is untouched
    assert torch.equal(raw(msg.tensors["grad"]), before)
    assert msg.meta["blob"] == b"x" * 100_000 and isinstance(msg.meta["blob"], bytes)  # bins in meta stay bytes


def test_spans_are_the_large_bins_under_tensors_only() -> None:
    data = step(rows=8192)
    spans = bulk_bins(memoryview(data))
    assert [s.end - s.start for s in spans] == [8192 * 32 * 4, 8195 * 32 * 2]  # not meta's blob, not the mask
    assert bulk_bins(memoryview(data + b"\x00")) is None  # trailing bytes: left to the ordinary decode
    assert bulk_bins(memoryview(data[:-1])) is None  # cut short
    assert bulk_bins(memoryview(msgpack.packb([msgpack.ExtType(1, b"")]))) is None


def test_a_placeholder_from_the_network_is_refused_like_any_ext_type() -> None:
    doc = {"v": 1, "kind": "k", "tensors": {"t": {"dtype": "uint8", "shape": [4], "codec": "raw",
                                                  "data": msgpack.ExtType(BULK_EXT, b"\x00\x00\x00\x00"),
                                                  "pad": b"\x00" * (2 * inplace.BULK_MIN)}}}
    data = msgpack.packb(doc, use_bin_type=True)
    assert outcome(buffer_of(data)) == outcome(data) == f"msgpack ext types are not allowed (got ext type {BULK_EXT})"


def test_the_buffer_holds_no_more_than_its_capacity() -> None:
    buf = MessageBuffer(10)
    buf.write(b"0123456789")
    with pytest.raises(ValueError, match="capacity of 10"):
        buf.write(b"x")
    assert bytes(buf.view()) == b"0123456789"


_SAMPLES = [step(rows=64, width=8), encode(Message("fwd", meta={"ids": [1, 2], "b": b"\x00" * 40},
                                                   tensors={"h": torch.arange(300.0), "m": torch.arange(70) % 2 == 0,
                                                            "e": torch.zeros(0, 4)}), codec="lz4")]


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(_SAMPLES) - 1),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["set", "del", "ins"])),
                      max_size=3),
       cut=st.none() | st.integers(0, 10_000))
def test_in_place_and_ordinary_decodes_agree_on_any_bytes(which: int, edits: list[tuple[int, int, str]],
                                                          cut: int | None) -> None:
    buf = bytearray(_SAMPLES[which])
    for pos, val, op in edits:
        i = pos % len(buf)
        if op == "set":
            buf[i] = val
        elif op == "del":
            del buf[i]
        else:
            buf.insert(i, val)
    if cut is not None:
        del buf[cut % (len(buf) + 1):]
    data = bytes(buf)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inplace, "BULK_MIN", 1)  # every tensor bin in place, however small
        assert outcome(buffer_of(data, chunk=37), max_tensor_elements=10_000) == \
            outcome(data, max_tensor_elements=10_000)
