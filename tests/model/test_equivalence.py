"""Split training equals unsplit peft LoRA training: K steps through user -> edge -> cloud against one model,
for a tiny random checkpoint of every described family (``splitllm verify-split --model tiny-<model type>``)."""

from __future__ import annotations

import pytest

from shared.lab.verify import verify_split
from shared.model.families import FAMILIES

TOLERANCE = 1e-5
STEPS = 5

CASES = [
    # (model, (a, b)) -- 4 blocks each: a=0 (user holds only embeddings), a=b (no edge blocks),
    # b=L (no cloud blocks), a=b=0 and a=b=L (one tier holds every block)
    ("tiny-llama", (1, 3)),
    ("tiny-llama", (0, 2)),
    ("tiny-llama", (2, 2)),
    ("tiny-llama", (1, 4)),
    ("tiny-llama", (0, 0)),
    ("tiny-llama", (4, 4)),
    ("tiny-gpt2", (1, 3)),
    ("tiny-gpt2", (0, 4)),
    ("tiny-gpt2", (3, 3)),
    ("tiny-gpt2", (4, 4)),
    ("tiny-bert", (1, 3)),
    ("tiny-bert", (0, 1)),
    ("tiny-bert", (2, 4)),
    ("tiny-bert", (0, 0)),
    ("tiny-bert", (4, 4)),
]


# Every family at a = 0 (the user holds only embeddings), a = b (no edge blocks) and b = L (no cloud blocks),
# on its first task (causal LM, or classification for encoders); decoders' classification heads at 1,3.
FAMILY_CASES = [(t, f.tasks[0], s) for t, f in FAMILIES.items() for s in [(0, 2), (3, 3), (1, 4)]] + \
    [(t, "cls", (1, 3)) for t, f in FAMILIES.items() if f.tasks == ("lm", "cls")]


def check(result, steps: int = STEPS) -> None:
    assert len(result.split_losses) == len(result.whole_losses) == steps
    assert result.num_adapter_tensors > 0
    assert result.max_loss_diff <= TOLERANCE, (result.split_losses, result.whole_losses)
    assert result.max_weight_diff <= TOLERANCE


@pytest.mark.parametrize("model, split", CASES, ids=[f"{m}-{a},{b}" for m, (a, b) in CASES])
def test_split_training_equals_whole_model(tiny, model: str, split: tuple[int, int]) -> None:
    tiny(model)  # generated into this session's cache
    check(verify_split(model, split, steps=STEPS))


def test_classification_on_a_decoder_equals_whole_model(tiny) -> None:
    """A Llama with a new score head (last-token pooling over right-padded rows)."""
    tiny("tiny-llama")
    result = verify_split("tiny-llama", (1, 3), steps=3, task="cls")
    check(result, steps=3)


@pytest.mark.parametrize("model_type, task, split", FAMILY_CASES,
                         ids=[f"{t}-{task}-{a},{b}" for t, task, (a, b) in FAMILY_CASES])
def test_every_family_trains_split_as_whole(tiny, model_type: str, task: str, split: tuple[int, int]) -> None:
    model = f"tiny-{model_type}"
    tiny(model)
    result = verify_split(model, split, steps=3, task=task)
    assert result.family == model_type
    check(result, steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("model, split", [("minilm-l6", (2, 4)), ("smollm2-135m", (2, 15))])
def test_bundled_model_split_equals_whole_model(model: str, split: tuple[int, int]) -> None:
    result = verify_split(model, split, steps=STEPS)
    print(f"{model} {split}: max_loss_diff={result.max_loss_diff:.3e} max_weight_diff={result.max_weight_diff:.3e} "
          f"adapter tensors={result.num_adapter_tensors}")
    check(result)


U_SHAPED = [("tiny-llama", (1, 3)), ("tiny-llama", (4, 4)), ("tiny-gpt2", (0, 2)), ("tiny-bert", (1, 3)),
            ("tiny-bert", (2, 4))]


@pytest.mark.parametrize("model, split", U_SHAPED, ids=[f"{m}-{a},{b}" for m, (a, b) in U_SHAPED])
def test_the_u_shaped_chain_equals_whole_model(tiny, model: str, split: tuple[int, int]) -> None:
    """Labels stay on the device: the user holds the head and the loss; the result is the same training."""
    tiny(model)
    check(verify_split(model, split, steps=STEPS, u_shaped=True))
