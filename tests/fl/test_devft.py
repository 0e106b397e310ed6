"""DevFT: the schedule and its refusals, knowledge transfer, the stage's submodel on each tier, the last stage
is the full model, stages in the simulator and their round metrics."""

from __future__ import annotations

import pytest
import torch

from plans import make_plan
from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl import Participant, StrategyContext, get_algorithm
from shared.fl.devft import DevFTConfig, block_ids, reshape, transfer
from shared.model.adapters import initial_state
from shared.model.partition import Split
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from shared.runtime.tier import TierRuntime

SUFFIXES = ("self_attn.q_proj.lora_A.weight", "self_attn.q_proj.lora_B.weight")


def adapters(blocks: list[int], value_of=lambda b, s: float(10 * b + s)) -> dict[str, torch.Tensor]:
    """Adapters of ``blocks`` whose values say where they come from (10 * block + the tensor's index)."""
    return {f"blocks.{b}.{name}": torch.full((2, 2), value_of(b, s)) for b in blocks for s, name in enumerate(SUFFIXES)}


# --- the schedule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, reason", [
    ({}, "'layers' must list each stage's number of layers"),
    ({"layers": [4, 0]}, "'layers' must list"),
    ({"layers": [8, 4, 30]}, "stages must grow: stage 2 has 4 layers, not more than stage 1's 8"),
    ({"layers": [4, 4]}, "stages must grow"),
    ({"layers": [4, 8], "rounds": [1, 2, 3]}, "'rounds' must be a number of rounds >= 1 or one per stage"),
    ({"layers": [4, 8], "rounds": 0}, "'rounds'"),
    ({"layers": [4], "beta": 2}, "beta must be a number in [0, 1]"),
])
def test_a_malformed_schedule_is_refused(config: dict, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason.replace("[", r"\[").replace("]", r"\]")):
        DevFTConfig.from_dict(config)


@pytest.mark.parametrize("layers, reason", [
    ([4, 8, 16], "must end at the model's full depth, 30 layers (its last stage has 16)"),
    ([4, 8, 31], "stage 3 has 31 layers, more than the model's 30"),
    ([2, 8, 30], "stage 1 has 2 layers, but 3 tiers hold blocks (split 2,15)"),
])
def test_a_schedule_the_model_cannot_run_is_refused(layers: list[int], reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason.replace("(", r"\(").replace(")", r"\)")):
        DevFTConfig(layers=layers).check_model(Split(2, 15, 30))
    DevFTConfig(layers=[3, 8, 30], rounds=[1, 2, 3]).check_model(Split(2, 15, 30))  # fine


@pytest.mark.parametrize("layers, reason", [([3], "full depth, 4 layers"), ([3, 5], "more than the model's 4"),
                                            ([4, 3], "stages must grow"), ([2, 4], "each needs at least one")])
def test_the_coordinator_refuses_a_bad_schedule_before_the_round(small_sim, layers: list[int], reason: str) -> None:
    sim = small_sim()  # tiny-llama, 4 blocks, split (1, 3)
    with pytest.raises(InvalidInput, match=reason):
        sim.coordinator.new_round(RoundConfig(algorithm="devft", config={"layers": layers}))
    assert not sim.coordinator.rounds


def test_the_stage_follows_the_committed_rounds_and_the_last_stage_goes_on() -> None:
    strategy = get_algorithm("devft").strategy({"layers": [3, 8, 30], "rounds": [1, 2, 1]}, StrategyContext(Tier.CLOUD))
    users = [Participant("u", "e")]
    stages = []
    for round_id in range(1, 7):
        stages.append(strategy.configure_round(round_id, users)["u"])
        if round_id != 3:  # round 3 fails: it does not count
            strategy.after_round(round_id, {})
    assert [s["stage"] for s in stages] == [1, 2, 2, 2, 3, 3]
    assert [s["layers"] for s in stages] == [3, 8, 8, 8, 30, 30]


def test_a_restarted_cloud_resumes_from_the_stage_the_global_adapters_have() -> None:
    spec = ModelSpec("x", (1, 3), "lm")  # 6 blocks: user [0], edge [1, 2], cloud [3, 4, 5]
    config = {"layers": [3, 4, 6], "rounds": 2}
    shaped = AdapterBundle({Tier.USER: adapters([0]), Tier.EDGE: adapters([1]), Tier.CLOUD: adapters([3, 5])})
    fresh = get_algorithm("devft").strategy(config, StrategyContext(Tier.CLOUD, spec, num_layers=6))
    fresh.before_round(1, shaped)  # stage 2's shape (1, 1, 2)
    assert fresh.configure_round(1, [Participant("u", "e")])["u"]["stage"] == 2
    full = AdapterBundle({Tier.USER: adapters([0]), Tier.EDGE: adapters([1, 2]), Tier.CLOUD: adapters([3, 4, 5])})
    again = get_algorithm("devft").strategy(config, StrategyContext(Tier.CLOUD, spec, num_layers=6))
    again.before_round(1, full)  # the full depth: version 0 looks the same, so the schedule starts over
    assert again.configure_round(1, [Participant("u", "e")])["u"]["stage"] == 1


def test_a_round_with_a_user_at_its_own_cut_is_refused_with_the_users_named() -> None:
    spec = ModelSpec("x", (1, 3), "lm")
    strategy = get_algorithm("devft").strategy({"layers": [3, 6]}, StrategyContext(Tier.CLOUD, spec, num_layers=6))
    at_default = [Participant("u0", "e"), Participant("u1", "e", cut=1)]
    assert set(strategy.configure_round(1, at_default)) == {"u0", "u1"}
    with pytest.raises(InvalidInput, match=r"\['u2'\] hold their own cut.*split 1,3"):
        strategy.configure_round(2, [*at_default, Participant("u2", "e", cut=2)])


# --- knowledge transfer ---------------------------------------------------------------------------------------


def test_transfer_copies_each_representatives_adapters_to_every_layer_of_its_group() -> None:
    head = {"head.score.weight": torch.ones(3)}
    state = {**adapters([2, 5]), **head, **adapters([9])}  # block 9 is another tier's: it passes through
    out = transfer(state, [2, 3, 4, 5, 6])
    for block, representative in ((2, 2), (3, 2), (4, 2), (5, 5), (6, 5)):
        for s, name in enumerate(SUFFIXES):
            assert torch.equal(out[f"blocks.{block}.{name}"], torch.full((2, 2), 10.0 * representative + s))
    assert torch.equal(out["head.score.weight"], head["head.score.weight"]) and "blocks.9." + SUFFIXES[0] in out
    out["blocks.3." + SUFFIXES[0]] += 1  # copies, not views of the representative's tensor
    assert torch.equal(out["blocks.2." + SUFFIXES[0]], torch.full((2, 2), 20.0))
    assert block_ids(reshape(state, [2, 3, 4, 5, 6], {2, 4, 6})) == [2, 4, 6, 9]
    assert torch.equal(reshape(state, [2, 3, 4, 5, 6], {2, 4, 6})["blocks.6." + SUFFIXES[1]], torch.full((2, 2), 51.0))
    with pytest.raises(InvalidInput, match="cannot be regrouped"):
        transfer(adapters([3, 5]), [2, 3, 4, 5, 6])  # the tier's first block has no representative


def test_an_update_in_the_next_stages_shape_is_checked_against_the_previous_adapters_reshaped() -> None:
    spec = ModelSpec("x", (1, 4), "lm")  # 6 blocks: edge [1, 2, 3]
    strategy = get_algorithm("devft").strategy({"layers": [3, 6]}, StrategyContext(Tier.EDGE, spec, num_layers=6))
    previous = adapters([1])
    strategy.validate_update(Tier.EDGE, adapters([1, 2, 3]), previous, "u")  # stage 2 from stage 1
    strategy.validate_update(Tier.EDGE, previous, previous, "u")  # the same stage
    for bad, reason in ((adapters([1, 2, 4]), "blocks \\[4\\] that its tier does not hold"),
                        (adapters([2, 3]), "block 1\\) has no representative"),
                        ({**adapters([1, 2]), "blocks.2.extra.weight": torch.zeros(2)}, "adapter keys differ"),
                        ({**adapters([1]), "blocks.2." + SUFFIXES[0]: torch.zeros(3)}, "adapter keys differ"),
                        ({**adapters([1, 2]), "blocks.2." + SUFFIXES[0]: torch.full((2, 2), float("nan"))},
                         "not a finite float")):
        with pytest.raises(InvalidInput, match=reason):
            strategy.validate_update(Tier.EDGE, bad, previous, "u")


# --- a stage's submodel on one tier ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge(tiny) -> TierRuntime:
    """tiny-llama's edge at split (0, 4): all four blocks (no user blocks; the cloud holds only the head)."""
    return TierRuntime(Tier.EDGE, tiny("tiny-llama"), ModelSpec(model="tiny-llama", split=(0, 4), task="lm"))


def devft_plan(layers: int | None, mode: str = "train", beta: float = 0.1):
    return make_plan(1, f"u{layers}{mode}", algorithm="devft", config={"layers": [1, 2, 4], "beta": beta},
                     extra={} if layers is None else {"stage": 0, "layers": layers}, mode=mode)


def test_a_stage_session_runs_its_anchors_with_fused_weights_and_packs_only_their_adapters(edge: TierRuntime) -> None:
    full = initial_state(edge.slots.shapes(), seed=3)
    session = edge.open_session(devft_plan(2), full)
    try:
        plugin = session.plugin
        anchors = plugin.layers_to_run(0)
        assert len(anchors) == 2 and anchors[0] == 0 and [g[0] for g in plugin.groups] == anchors
        assert [i for g in plugin.groups for i in g] == [0, 1, 2, 3]
        fused = [g for g in plugin.groups if len(g) > 1]
        assert fused and set(session.base) == {k for g in fused for k in edge.partition.state_dict()
                                               if k.startswith(f"blocks.{g[0]}.") and "lora_" not in k}
        group = fused[0]
        name = f"blocks.{group[0]}.mlp.down_proj.weight"
        ws = [edge.partition.get_parameter(f"blocks.{i}.mlp.down_proj.weight").double() for i in group]
        assert torch.allclose(session.base[name].double(), ws[0] + 0.1 * sum(w - ws[0] for w in ws[1:]), atol=1e-6)
        packed = edge.pack_update(session)
        assert block_ids(packed) == anchors
        assert all(torch.equal(packed[k], full[k]) for k in packed)  # no step yet: the anchors' own version-0 values
    finally:
        edge.close_session(*session.key)
    evaluation = edge.open_session(devft_plan(None, "eval"), packed)  # no stage in an evaluation plan: the shape says
    try:
        assert evaluation.plugin.groups == plugin.groups and set(evaluation.base) == set(session.base)
    finally:
        edge.close_session(*evaluation.key)


def test_the_next_stage_starts_its_new_representatives_from_their_groups_old_ones(edge: TierRuntime) -> None:
    stage1 = {k: v for k, v in initial_state(edge.slots.shapes(), seed=4).items() if k.startswith("blocks.0.")}
    session = edge.open_session(devft_plan(2), stage1)
    try:
        [_, second] = session.plugin.layers_to_run(0)
        for key, value in stage1.items():  # the new representative starts from the one whose group held it
            assert torch.equal(session.params[key.replace("blocks.0.", f"blocks.{second}.")].detach(), value)
    finally:
        edge.close_session(*session.key)


def test_the_last_stage_is_exactly_the_full_model(edge: TierRuntime) -> None:
    full = initial_state(edge.slots.shapes(), seed=5)
    session = edge.open_session(devft_plan(4), full)
    try:
        assert session.plugin.layers_to_run(0) == [0, 1, 2, 3] and session.base == {}
        assert set(edge.pack_update(session)) == set(full)
    finally:
        edge.close_session(*session.key)


def test_a_step_in_the_last_stage_equals_plain_split_training(small_sim) -> None:
    """One round from the same version 0: DevFT whose only stage is the full depth against FedAvg."""
    results = {}
    for algorithm, config in (("fedavg", {}), ("devft", {"layers": [4]})):
        sim = small_sim(algorithm=algorithm, config=config, local_steps=3, split=(1, 3))
        sim.run_round()
        losses = {u: m["losses"] for u, m in sim.coordinator.rounds[1].metrics["users"].items()}
        results[algorithm] = (sim.coordinator.global_state, losses)
    (plain, plain_losses), (devft, devft_losses) = results["fedavg"], results["devft"]
    for user, losses in plain_losses.items():
        assert devft_losses[user] == pytest.approx(losses, abs=1e-5)
    for tier in plain:
        assert set(devft[tier]) == set(plain[tier])
        for key, value in plain[tier].items():
            assert torch.allclose(devft[tier][key], value, atol=1e-5), key


# --- stages in the simulator -----------------------------------------------------------------------------------


def test_stages_grow_in_the_simulator_with_their_metrics(small_sim) -> None:
    sim = small_sim(algorithm="devft", config={"layers": [3, 4], "rounds": 1}, split=(1, 3))
    rows = [sim.run_round() for _ in range(3)]
    metrics = [sim.coordinator.rounds[r["round"]].metrics for r in rows]
    assert [m["devft"]["stage"] for m in metrics] == [1, 2, 2]
    assert metrics[0]["devft"]["representatives"] == {"user": [0], "edge": [1], "cloud": [3]}
    assert metrics[1]["devft"]["representatives"] == {"user": [0], "edge": [1, 2], "cloud": [3]}
    assert metrics[0]["blocks_per_step"] == {"user": 1.0, "edge": 1.0, "cloud": 1.0}
    assert metrics[1]["blocks_per_step"] == {"user": 1.0, "edge": 2.0, "cloud": 1.0}
    assert all(m["compute_seconds"][t] > 0 for m in metrics for t in ("user", "edge", "cloud"))
    assert all(m["bytes"]["user_edge"]["up"] > 0 for m in metrics)
    assert block_ids(sim.coordinator.global_state[Tier.EDGE]) == [1, 2]
    plain = small_sim(split=(1, 3))
    plain.run_round()
    assert plain.coordinator.rounds[1].metrics["blocks_per_step"] == {"user": 1.0, "edge": 2.0, "cloud": 1.0}
    assert "devft" not in plain.coordinator.rounds[1].metrics
