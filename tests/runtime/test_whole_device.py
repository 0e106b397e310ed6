"""A device holding the whole model (split a = b = L, U-shaped): federated learning's device. Its steps send nothing
(only the round's start and its update cross its link), and train exactly as the same steps relayed through serving
tiers that hold no block."""

from __future__ import annotations

import pytest
import torch

from shared.config.round import RoundConfig
from shared.lab.sim import SimConfig, Simulation
from shared.model.sources import resolve_model


def run(local: bool, micro_batches: int = 1) -> tuple[Simulation, dict]:
    layers = resolve_model("tiny-llama").num_layers
    sim = Simulation(SimConfig(
        model="tiny-llama", data="shakespeare", users=2, edges=1, rounds=1, split=(layers, layers), u_shaped=True,
        max_len=16, max_examples_per_client=12, eval_examples_per_client=4, baseline_eval=False,
        round=RoundConfig(local_steps=3, batch_size=4, micro_batches=micro_batches)))
    for user in sim.users:
        assert user.whole
        user.whole = local  # False: the same steps relayed through the edge and the cloud, as before
    row = sim.run_round()
    return sim, row


def test_a_whole_model_device_trains_locally_as_the_relayed_chain_would(hermetic_cache) -> None:
    relayed, relayed_row = run(local=False)
    local, local_row = run(local=True)
    for tier, state in relayed.coordinator.global_state.items():
        for key, value in state.items():
            torch.testing.assert_close(local.coordinator.global_state[tier][key], value, rtol=0, atol=1e-5)
    assert local_row["train_loss"] == pytest.approx(relayed_row["train_loss"], abs=1e-5)
    assert local_row["eval_loss"] == pytest.approx(relayed_row["eval_loss"], abs=1e-5)
    endpoints = {e for link in local.user_links for e in link.stats.snapshot()["by_endpoint"]}
    assert endpoints == {"start", "update"}  # no step, no backward: the adapters only
    assert "step" in {e for link in relayed.user_links for e in link.stats.snapshot()["by_endpoint"]}
    assert local_row["compute_seconds"]["edge"] == local_row["compute_seconds"]["cloud"] == 0


def test_micro_batches_on_a_whole_model_device_give_the_same_update(hermetic_cache) -> None:
    one, _ = run(local=True)
    two, _ = run(local=True, micro_batches=2)
    for tier, state in one.coordinator.global_state.items():
        for key, value in state.items():
            torch.testing.assert_close(two.coordinator.global_state[tier][key], value, rtol=0, atol=1e-5)
