"""The README's wire examples, built with plain msgpack as a client in another language would (not with the
project's encoder), are accepted by the tiers' parsers; and the project's encoder says the same thing. Its tensor
entries in each codec decode to the values shown, and the project's encoder writes exactly those bytes."""

from __future__ import annotations

import msgpack
import pytest
import torch

from shared.protocol.messages import BackwardRequest, EvalReply, OutputReply, Report, StepRequest, TrainReply, Update
from shared.protocol.starts import RoundStart, UserStart
from shared.protocol.wire import Message, decode, encode
from wire_examples import client_bytes, codec_examples, entry_of, examples, values_of

PARSERS = {"step": StepRequest, "grad": TrainReply, "eval": EvalReply, "output": OutputReply, "backward": BackwardRequest,
           "user-start": UserStart, "edge-start": RoundStart, "update": Update, "failure": Update, "report": Report}

def test_the_readme_has_an_example_of_every_message() -> None:
    assert set(examples()) == set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_readme_example_parses_and_round_trips(name: str) -> None:
    example = examples()[name]
    msg = decode(client_bytes(example))
    parsed = PARSERS[name].from_message(msg)
    again = decode(encode(parsed.to_message()))
    assert again.kind == example["kind"]
    assert again.meta == example.get("meta", {}), "the project's encoder writes the meta the README shows"
    assert set(again.tensors) == set(example.get("tensors", {}))
    for tensor, entry in example.get("tensors", {}).items():
        assert list(again.tensors[tensor].shape) == entry["shape"]
        assert again.tensors[tensor].flatten().tolist() == pytest.approx(entry["values"])


def test_the_readme_has_an_entry_of_every_codec() -> None:
    codecs = {e["entry"]["codec"] for e in codec_examples().values()}
    assert codecs == {"fp16", "bf16", "int8", "int4", "topk", "lz4"}
    assert any(e["entry"].get("post") == "shuffle-lz4" for e in codec_examples().values())
    assert any(e["entry"].get("channels") == "rms" for e in codec_examples().values())


@pytest.mark.parametrize("name", sorted(codec_examples()))
def test_every_readme_codec_entry_decodes_and_is_what_the_encoder_writes(name: str) -> None:
    example = codec_examples()[name]
    entry = entry_of(example)
    body = msgpack.packb({"v": 1, "kind": "t", "tensors": {"x": entry}}, use_bin_type=True)
    decoded = decode(body).tensors["x"]
    assert list(decoded.shape) == entry["shape"]
    assert decoded.flatten().tolist() == values_of(example, "decoded" if "decoded" in example else "values")
    if "spec" in example:
        sent = torch.tensor(values_of(example), dtype=torch.float32).reshape(entry["shape"])
        written = msgpack.unpackb(encode(Message("t", {}, {"x": sent}), codec=example["spec"]))["tensors"]["x"]
        assert written == entry, "the project's encoder writes exactly the README's bytes"
