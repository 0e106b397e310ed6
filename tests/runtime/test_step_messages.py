"""What crosses between tiers in a step: packed activations, the mask and the labels; gradients back."""

from __future__ import annotations


import torch

from plans import make_plan
from shared.data.batching import collate
from shared.data.datasets import Example
from shared.model.tokenizers import ByteTokenizer
from shared.protocol.transport import InProcessLink
from user_agent.compute import step_request


# --- what crosses between tiers --------------------------------------------------------------------


def test_step_message_carries_only_hidden_mask_and_labels() -> None:
    batch = collate(ByteTokenizer(), [Example("ab"), Example("abcdef")], "lm", 16)
    hidden = torch.randn(2, batch.input_ids.shape[1], 32)
    msg = step_request(make_plan(round_id=3), 5, hidden, batch).to_message()
    assert set(msg.tensors) == {"hidden", "attention_mask", "labels"}
    assert msg.tensors["attention_mask"].dtype == torch.uint8
    assert msg.meta == {"round": 3, "user": "u", "step": 5, "mode": "train"}


def test_step_chain_carries_no_rotary_or_position_tensors(small_sim, monkeypatch) -> None:
    """Every step message of a real round, both hops, both phases: activations, mask, labels down; grads back."""
    seen: list[tuple[str, set[str], set[str]]] = []
    real = InProcessLink.request

    def spy(self, endpoint, msg):
        reply = real(self, endpoint, msg)
        if endpoint == "step":
            seen.append((msg.meta["mode"], set(msg.tensors), set(reply.tensors)))
        return reply

    monkeypatch.setattr(InProcessLink, "request", spy)
    small_sim().run_round()
    assert {m for m, _, _ in seen} == {"train", "eval"}
    for mode, sent, returned in seen:
        assert sent == {"hidden", "attention_mask", "labels"}
        assert returned == ({"grad"} if mode == "train" else set())
