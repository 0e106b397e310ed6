"""The optional shuffle-lz4 post-processing of lossy entries (shared.protocol.codecs.entries)."""

from __future__ import annotations

import torch

from shared.protocol.wire import Message, decode, encode

from codec_helpers import DROP, entry_of, refused, repack


def test_shuffle_lz4_shrinks_compressible_payloads() -> None:
    x = (torch.arange(4096) % 16).float().reshape(64, 64)
    plain = encode(Message("k", tensors={"x": x}), tensor_codecs={"x": "bf16"})
    packed = encode(Message("k", tensors={"x": x}), tensor_codecs={"x": "bf16+shuffle-lz4"})
    assert entry_of(packed)["post"] == "shuffle-lz4" and "post" not in entry_of(plain)
    assert len(packed) < len(plain) / 4
    assert torch.equal(decode(packed).tensors["x"], x)
    # incompressible: the flag is dropped rather than sending a bigger payload
    noise = torch.randn(4096)
    e = entry_of(encode(Message("k", tensors={"x": noise}), tensor_codecs={"x": "fp16+shuffle-lz4"}))
    assert "post" not in e and len(e["data"]) == 8192


def test_refuse_bad_post_payloads() -> None:
    x = (torch.arange(8192) % 5).float()
    data = encode(Message("k", tensors={"x": x}), tensor_codecs={"x": "int8+shuffle-lz4"})
    e = entry_of(data)
    assert e["post"] == "shuffle-lz4"
    refused(repack(data, data=e["data"][:-3]), "tensor 'x': (corrupt lz4 block in int8 payload|int8 payload decompresses)")
    refused(repack(data, data=b"\xff" * 40), "tensor 'x': (corrupt lz4 block|int8 payload decompresses)")
    refused(repack(data, shape=[8193]), "int8 (scales decompress|payload decompresses) to|corrupt lz4")
    refused(repack(data, post=DROP), "int8 scales have")  # compressed bytes taken as plain ones
    # a plain entry claiming post: its bytes are not an lz4 block of the right size
    plain = encode(Message("k", tensors={"x": torch.randn(256)}), tensor_codecs={"x": "fp16"})
    refused(repack(plain, post="shuffle-lz4"), "tensor 'x': (corrupt lz4|fp16 payload decompresses)")
    assert (decode(data).tensors["x"] - x).abs().max() <= 4 / 254 + 1e-6
