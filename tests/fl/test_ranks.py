"""Per-client LoRA ranks and plain FedAvg over them (``shared.model.adapters``: ``truncate_rank``/``pad_rank``).

The documented rule: a deployment's adapters have its rank R (the largest its users may declare); a user of
rank r < R trains their first r components (HetLoRA's truncation on download) and uploads them zero-padded
back to R, so plain FedAvg averages each component over every user, a lower-rank user counting as zero for
the components it lacks."""

from __future__ import annotations

import pytest
import torch

from shared.config.round import RoundConfig
from shared.lab.sim import SimConfig, Simulation
from shared.model.adapters import LoraSettings, pad_rank, rank_axis, truncate_rank

SETTINGS = {"model": "tiny-llama", "data": "trec", "users": 2, "edges": 1, "rounds": 1, "max_len": 24,
            "max_examples_per_client": 8, "eval_examples_per_client": 4, "split": (1, 3)}


def test_truncation_keeps_the_first_components_and_padding_restores_the_shape_with_zeros() -> None:
    state = {"blocks.0.q.lora_A": torch.randn(4, 6), "blocks.0.q.lora_B": torch.randn(5, 4), "head.score.weight":
             torch.randn(3, 6)}
    assert [rank_axis(k) for k in state] == [0, 1, None]
    low = truncate_rank(state, 2)
    assert low["blocks.0.q.lora_A"].shape == (2, 6) and low["blocks.0.q.lora_B"].shape == (5, 2)
    assert torch.equal(low["blocks.0.q.lora_A"], state["blocks.0.q.lora_A"][:2])
    assert torch.equal(low["head.score.weight"], state["head.score.weight"])  # no rank: whole
    back = pad_rank(low, {k: tuple(v.shape) for k, v in state.items()})
    assert torch.equal(back["blocks.0.q.lora_B"][:, :2], state["blocks.0.q.lora_B"][:, :2])
    assert not back["blocks.0.q.lora_B"][:, 2:].any() and not back["blocks.0.q.lora_A"][2:].any()


@pytest.mark.parametrize("ranks", [[2, 2], [2, 4]])
def test_fedavg_over_mixed_ranks_zero_pads_the_components_a_user_lacks(hermetic_cache, ranks: list[int]) -> None:
    sim = Simulation(SimConfig(**SETTINGS, lora=LoraSettings(rank=4), ranks=ranks,
                               round=RoundConfig(local_steps=2, batch_size=2, evaluate=False)))
    assert sim.spec.lora.rank == 4
    before = {k: v.clone() for k, v in sim.coordinator.global_state["edge"].items()}
    sim.run_record()
    after = sim.coordinator.global_state["edge"]
    a_keys = [k for k in after if k.endswith("lora_A.weight") or "lora_A" in k]
    assert a_keys
    for key in a_keys:
        tail_before, tail_after = before[key][2:], after[key][2:]
        if ranks == [2, 2]:  # no user trains components 2..3: their mean is zero
            assert not tail_after.any(), key
        else:  # one of two equal-weight users trains them: half its trained value, never the untouched one
            assert tail_after.any() and not torch.allclose(tail_after, tail_before), key
