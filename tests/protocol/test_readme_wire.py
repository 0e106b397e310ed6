"""The README's wire examples, built with plain msgpack as a client in another language would (not with the
project's encoder), are accepted by the tiers' parsers; and the project's encoder says the same thing."""

from __future__ import annotations

import pytest

from shared.protocol.messages import (BackwardRequest, EvalReply, OutputReply, Report, RoundStart, StepRequest,
                                      TrainReply, Update, UserStart)
from shared.protocol.wire import decode, encode
from wire_examples import client_bytes, examples

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
