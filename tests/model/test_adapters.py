"""Adapters on a partition: normalised keys, shapes from the config alone, version-0 values."""

from __future__ import annotations

import math
import re

import pytest
import torch

from shared.model.adapters import initial_state
from shared.model.partition import (TIERS, Split)
from shared.config.deployment import ModelSpec
from shared.runtime.tier import TierRuntime, adapter_shapes

L = 4  # blocks of every tiny model
NUM_LABELS = {"lm": 0, "cls": 3}


def tier_of(norm_name: str, split: Split) -> str:
    if norm_name.startswith("embed."):
        return "user"
    if norm_name.startswith("head."):
        return "cloud"
    return split.tier_of_layer(int(norm_name.split(".")[1]))


# --- adapters --------------------------------------------------------------------------------------

ADAPTER_CASES = [("tiny-llama", "lm", (1, 3)), ("tiny-gpt2", "lm", (0, 2)), ("tiny-bert", "cls", (1, 3)),
                 ("tiny-llama", "cls", (2, 4)), ("tiny-bert", "cls", (4, 4)), ("tiny-qwen2", "lm", (1, 3)),
                 ("tiny-gpt_neox", "cls", (0, 3)), ("tiny-roberta", "cls", (1, 3)), ("tiny-phi3", "lm", (2, 2))]
# the classification heads transformers adds on a base model (BERT's linear, RoBERTa's dense + out_proj, score)
NEW_HEADS = {"lm": set(), "cls": {"head.classifier.weight", "head.classifier.bias", "head.score.weight",
                                  "head.classifier.dense.weight", "head.classifier.dense.bias",
                                  "head.classifier.out_proj.weight", "head.classifier.out_proj.bias"}}


def _spec(model: str, task: str, split: tuple[int, int]) -> ModelSpec:
    return ModelSpec(model=model, split=split, task=task, num_labels=NUM_LABELS[task])


@pytest.mark.parametrize("model, task, split", ADAPTER_CASES)
def test_adapter_keys_are_normalised_and_the_same_from_meta_and_loaded(tiny, model, task, split) -> None:
    source, s = tiny(model), Split(*split, L)
    family = source.family
    spec = _spec(model, task, split)
    meta = adapter_shapes(source, spec)
    all_keys: list[str] = []
    for tier in TIERS:
        runtime = TierRuntime(tier, source, spec)
        assert runtime.slots.shapes() == meta[tier], tier
        assert runtime.slots.keys == sorted(meta[tier])
        for key in meta[tier]:
            assert ".default" not in key and key.startswith(("blocks.", "head.")), key
            assert tier_of(key, s) == tier, key
            if key.startswith("blocks."):
                assert re.search(r"\.lora_[AB]\.weight$", key), key
                assert any(f".{t}.lora_" in key for t in family.lora_targets), key
            else:
                assert task == "cls" and key in NEW_HEADS["cls"], key
        all_keys += meta[tier]
    assert len(all_keys) == len(set(all_keys)) > 0  # unique across tiers: blocks carry global indices
    n_lora = sum(k.startswith("blocks.") for k in all_keys)
    assert n_lora == 2 * L * len(family.lora_targets)


def test_adapter_shapes_loads_nothing(tiny, monkeypatch) -> None:
    import safetensors

    source = tiny("tiny-llama")
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("adapter_shapes read the checkpoint"))
    shapes = adapter_shapes(source, _spec("tiny-llama", "lm", (1, 3)))
    assert set(shapes) == set(TIERS) and all(shapes.values())


def test_lora_shapes_follow_rank(tiny) -> None:
    shapes = adapter_shapes(tiny("tiny-llama"), _spec("tiny-llama", "lm", (1, 3)))
    flat = {k: v for t in shapes.values() for k, v in t.items()}
    assert flat["blocks.0.self_attn.q_proj.lora_A.weight"] == (8, 32)
    assert flat["blocks.0.self_attn.q_proj.lora_B.weight"] == (32, 8)
    assert flat["blocks.3.self_attn.k_proj.lora_B.weight"] == (16, 8)  # 2 key/value heads of 8


def _flat_shapes(tiny, model, task, split) -> dict[str, tuple[int, ...]]:
    shapes = adapter_shapes(tiny(model), _spec(model, task, split))
    return {k: v for t in shapes.values() for k, v in t.items()}


def test_initial_state_is_deterministic_per_key(tiny) -> None:
    shapes = _flat_shapes(tiny, "tiny-bert", "cls", (1, 3))
    state = initial_state(shapes, seed=7)
    again = initial_state(shapes, seed=7)
    other_seed = initial_state(shapes, seed=8)
    for key, shape in shapes.items():
        assert torch.equal(state[key], again[key]), key
        alone = initial_state({key: shape}, seed=7)[key]  # made without any other key
        assert torch.equal(alone, state[key]), key
        if ".lora_B." not in key and not key.endswith(".bias"):
            assert not torch.equal(other_seed[key], state[key]), key


def test_initial_state_does_not_depend_on_the_tier_that_makes_it(tiny) -> None:
    """Blocks 1 and 2 sit on the edge with split 1,3 and on the user with split 3,3: same initial tensors."""
    tiers_13 = adapter_shapes(tiny("tiny-llama"), _spec("tiny-llama", "lm", (1, 3)))
    tiers_33 = adapter_shapes(tiny("tiny-llama"), _spec("tiny-llama", "lm", (3, 3)))
    on_edge = initial_state(tiers_13["edge"], seed=0)
    on_user = initial_state(tiers_33["user"], seed=0)
    assert on_edge and set(on_edge) <= set(on_user)
    for key, value in on_edge.items():
        assert torch.equal(value, on_user[key]), key


def test_initial_values_lora_b_zero_a_bounded_head_small(tiny) -> None:
    shapes = _flat_shapes(tiny, "tiny-bert", "cls", (1, 3))
    state = initial_state(shapes, seed=0)
    for key, value in state.items():
        assert tuple(value.shape) == shapes[key] and value.dtype == torch.float32
        if ".lora_B." in key or key.endswith(".bias"):
            assert torch.count_nonzero(value) == 0, key
        elif ".lora_A." in key:
            bound = 1 / math.sqrt(value.shape[1])
            assert 0 < value.abs().max() <= bound, key
        else:
            assert key == "head.classifier.weight"
            assert 0.005 < float(value.std()) < 0.05
