"""The newer plug-in hooks: per-kind learning rates, a session's own frozen base weights, reshaping before a round."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from plans import make_plan
from shared.config.deployment import ModelSpec
from shared.fl import SessionPlugin, Strategy, register_algorithm
from shared.model.adapters import initial_state
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from shared.runtime.tier import TierRuntime

OVERRIDDEN = "blocks.1.self_attn.q_proj.base_layer.weight"  # an edge-tier projection of tiny-llama at split (1, 3)


class FreezeLoraB(SessionPlugin):
    """Trains the A factors only: the optimizer's step size is zero for every ``lora_B`` tensor."""

    def lr_scales(self) -> dict[str, float]:
        return {"lora_B": 0.0}


class ZeroOneProjection(SessionPlugin):
    """Runs with one projection's frozen base weight zeroed, for this session only."""

    def base_overrides(self, blocks):
        assert sorted(blocks) == self.ctx.layer_ids  # the tier's loaded blocks, by global index
        weight = blocks[1].get_submodule("self_attn.q_proj.base_layer").weight
        return {OVERRIDDEN: torch.zeros_like(weight)}


register_algorithm("test-freeze-lora-b", session=FreezeLoraB)
register_algorithm("test-zero-base", session=ZeroOneProjection)


@pytest.fixture(scope="module")
def edge_runtime(tiny) -> TierRuntime:
    return TierRuntime(Tier.EDGE, tiny("tiny-llama"), ModelSpec(model="tiny-llama", split=(1, 3), task="lm"))


def adapters_with_nonzero_b(runtime: TierRuntime) -> dict[str, torch.Tensor]:
    """The tier's initial adapters with random B factors (B = 0 would leave A without a gradient)."""
    gen = torch.Generator().manual_seed(5)
    state = initial_state(runtime.slots.shapes(), seed=1)
    return {k: (torch.randn(v.shape, generator=gen) * 0.1 if ".lora_B." in k else v) for k, v in state.items()}


def inputs(runtime: TierRuntime) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, runtime.width, generator=gen), torch.ones(2, 5, dtype=torch.uint8)


def one_step(runtime: TierRuntime, algorithm: str, user: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One training step of a fresh session on ``runtime``; its adapters afterwards."""
    session = runtime.open_session(make_plan(1, user, algorithm=algorithm, lr=1e-2), state)
    hidden, mask = inputs(runtime)
    out = runtime.forward(session, hidden, mask, 0)
    runtime.backward_and_step(session, [out], [torch.randn(out.shape, generator=torch.Generator().manual_seed(1))])
    runtime.close_session(1, user)
    return {k: p.detach().clone() for k, p in session.params.items()}


# --- lr_scales ----------------------------------------------------------------------------------------------------


def test_a_zero_lr_scale_leaves_every_lora_b_unchanged_while_lora_a_moves(edge_runtime) -> None:
    state = adapters_with_nonzero_b(edge_runtime)
    b_keys = [k for k in state if ".lora_B." in k]
    a_keys = [k for k in state if ".lora_A." in k]
    assert b_keys and a_keys
    frozen = one_step(edge_runtime, "test-freeze-lora-b", "frozen", state)
    for key in b_keys:
        assert torch.equal(frozen[key], state[key]), key
    for key in a_keys:
        assert not torch.equal(frozen[key], state[key]), key
    plain = one_step(edge_runtime, "fedavg", "plain", state)  # without the scales, B moves as well
    assert all(not torch.equal(plain[k], state[k]) for k in b_keys)
    for key in a_keys:  # A's step does not depend on B's step size (AdamW is elementwise)
        assert torch.equal(frozen[key], plain[key]), key


# --- base_overrides -----------------------------------------------------------------------------------------------


def _forward(runtime: TierRuntime, algorithm: str, user: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    session = runtime.open_session(make_plan(1, user, algorithm=algorithm, mode="eval"), state)
    hidden, mask = inputs(runtime)
    try:
        return runtime.forward(session, hidden, mask, 0)
    finally:
        runtime.close_session(1, user)


def test_a_base_override_changes_only_its_sessions_forward_and_the_partition_is_restored(edge_runtime) -> None:
    state = adapters_with_nonzero_b(edge_runtime)
    own = edge_runtime.partition.get_parameter(OVERRIDDEN)
    own_value = own.detach().clone()
    assert own.abs().sum() > 0
    before = _forward(edge_runtime, "fedavg", "a", state)
    overridden = _forward(edge_runtime, "test-zero-base", "b", state)
    assert not torch.allclose(overridden, before)  # the session ran with the zeroed projection
    after = _forward(edge_runtime, "fedavg", "c", state)
    assert torch.equal(after, before)  # another session afterwards: the tier's own weights again
    assert edge_runtime.partition.get_parameter(OVERRIDDEN) is own and torch.equal(own, own_value)
    with torch.no_grad():  # the override is exactly "this weight is zero" for that session
        own.zero_()
        try:
            zeroed = _forward(edge_runtime, "fedavg", "d", state)
        finally:
            own.copy_(own_value)
    assert torch.equal(overridden, zeroed)


def test_base_overrides_hold_for_training_steps_while_other_sessions_run(edge_runtime) -> None:
    state = adapters_with_nonzero_b(edge_runtime)
    plain = edge_runtime.open_session(make_plan(2, "plain", mode="eval"), state)
    override = edge_runtime.open_session(make_plan(2, "override", algorithm="test-zero-base", lr=1e-2), state)
    try:
        assert override.base and not plain.base
        hidden, mask = inputs(edge_runtime)
        reference = edge_runtime.forward(plain, hidden, mask, 0)
        out = edge_runtime.forward(override, hidden, mask, 0)
        assert torch.equal(edge_runtime.forward(plain, hidden, mask, 0), reference)  # interleaved: unaffected
        edge_runtime.backward_and_step(override, [out], [torch.ones_like(out)])
        assert override.steps == 1 and not edge_runtime.partition.get_parameter(OVERRIDDEN).requires_grad
        assert torch.equal(edge_runtime.forward(plain, hidden, mask, 0), reference)
    finally:
        edge_runtime.close_session(2, "plain")
        edge_runtime.close_session(2, "override")


# --- before_round -------------------------------------------------------------------------------------------------


STARTS: list[tuple[str, str, dict[str, torch.Tensor]]] = []  # (tier, mode, adapters a session was built from)
SCALE = 2.0


class ScaledStart(Strategy):
    """Doubles the user tier's adapters before every round (a stage change would reshape them likewise)."""

    def before_round(self, round_id: int, global_state: AdapterBundle) -> AdapterBundle:
        states = {t: dict(s) for t, s in global_state.items()}
        states[Tier.USER] = {k: v * SCALE for k, v in states[Tier.USER].items()}
        return AdapterBundle(states)


class RecordStart(SessionPlugin):
    """Records what each session starts from, and takes zero-sized steps (the round then commits its start)."""

    def build_adapters(self, state):
        STARTS.append((self.ctx.tier, self.plan.mode, {k: v.detach().cpu().clone() for k, v in state.items()}))
        return super().build_adapters(state)

    def lr_scales(self) -> dict[str, Any]:
        return {kind: 0.0 for kind in ("lora_A", "lora_B", "head")}


register_algorithm("test-scaled-start", strategy=ScaledStart, session=RecordStart)


def test_the_round_starts_from_what_before_round_returns(small_sim) -> None:
    sim = small_sim(algorithm="test-scaled-start", users=2, local_steps=2)
    initial = {t: {k: v.clone() for k, v in s.items()} for t, s in sim.coordinator.global_state.items()}
    assert any(v.abs().sum() > 0 for v in initial[Tier.USER].values())
    STARTS.clear()
    sim.run_round()
    starts = list(STARTS)
    STARTS.clear()
    scaled = {k: v * SCALE for k, v in initial[Tier.USER].items()}
    train = [(tier, state) for tier, mode, state in starts if mode == "train"]
    assert sorted(tier for tier, _ in train) == sorted(["user", "edge", "cloud"] * 2)
    for tier, state in train:  # every training session started from the reshaped bundle
        want = scaled if tier == "user" else initial[tier]
        assert state.keys() == want.keys()
        assert all(torch.equal(state[k], want[k]) for k in want), tier
    final = sim.coordinator.global_state  # zero steps: the aggregate is the start the round was given
    for tier in ("user", "edge", "cloud"):
        want = scaled if tier == "user" else initial[tier]
        assert all(torch.equal(final[tier][k], want[k]) for k in want), tier
    evals = [(tier, state) for tier, mode, state in starts if mode == "eval"]
    assert evals and all(torch.equal(state[k], final[tier][k]) for tier, state in evals for k in state)


def test_a_bad_base_override_is_refused_at_open_and_leaves_the_partition_as_it_was(tiny) -> None:
    """An override must name a frozen parameter of this partition with its shape; nothing is swapped otherwise."""

    class BadOverride(SessionPlugin):
        def base_overrides(self, blocks):
            good = "blocks.1.self_attn.q_proj.base_layer.weight"
            return {good: torch.zeros_like(blocks[1].self_attn.q_proj.base_layer.weight), "blocks.1.nope.weight": torch.zeros(1)}

    register_algorithm("test-bad-override", session=BadOverride)
    runtime = TierRuntime("edge", tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"))
    weight = runtime.partition.blocks["1"].self_attn.q_proj.base_layer.weight
    before = weight.detach().clone()
    with pytest.raises(ValueError, match="blocks.1.nope.weight"):
        runtime.open_session(make_plan(algorithm="test-bad-override"), initial_state(runtime.slots.shapes(), 0))
    assert runtime.partition.blocks["1"].self_attn.q_proj.base_layer.weight is weight and torch.equal(weight, before)
