"""DropPEFT: one skip mask on every tier, skipped blocks never run, eval runs all, the bandit, personal layers."""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from typing import Any

import pytest
import torch

from plans import make_plan
from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.fl import Participant, SessionContext, StrategyContext, get_algorithm, register_algorithm
from shared.fl.droppeft import (DropPEFTConfig, DropPEFTSession, DropPEFTStrategy, UCBPolicy, layer_ratios,
                                progress, skip_mask, tier_ranges)
from shared.protocol.enums import Tier
from shared.model.adapters import block_of
from shared.protocol.messages import RoundPlan

SPLIT = (2, 4)  # a 6-block model: user [0, 2), edge [2, 4), cloud [4, 6)
TIER_LAYERS = {"user": [0, 1], "edge": [2, 3], "cloud": [4, 5]}


def tier_session(tier: str, plan: RoundPlan, config: dict | None = None, store: dict | None = None,
                 num_layers: int = 6) -> DropPEFTSession:
    """The session plug-in a tier makes for ``plan`` (``config``: the plan's own unless given)."""
    ctx = SessionContext(Tier(tier), plan, TIER_LAYERS[tier], num_layers, ModelSpec("x", SPLIT, "lm"), {},
                         {} if store is None else store)
    return get_algorithm("droppeft").session(plan.config if config is None else config, ctx)


def coordinator(config: dict) -> DropPEFTStrategy:
    return get_algorithm("droppeft").strategy(config, StrategyContext(Tier.CLOUD))


# --- STLD: one mask, derived on every tier --------------------------------------------------------


def test_every_tier_derives_the_same_mask_from_the_shared_seed() -> None:
    skipped = Counter()
    draws = 0
    for user in ("user-0", "user-1"):
        for round_id in (1, 2):
            for ratio in (0.1, 0.3, 0.5):
                plan = make_plan(round_id, user, seed=7, algorithm="droppeft", extra={"ratio": ratio})
                tiers = {t: tier_session(t, plan) for t in TIER_LAYERS}  # one session per tier
                for step in range(100):
                    masks = {t: a.mask(step) for t, a in tiers.items()}
                    assert len({tuple(m) for m in masks.values()}) == 1  # identical on user, edge and cloud
                    ran = [i for a in tiers.values() for i in a.layers_to_run(step)]
                    assert ran == [i for i in range(6) if not masks["user"][i]]  # the tiers run exactly the kept blocks
                    if ratio == 0.5:
                        skipped.update(i for i in range(6) if masks["user"][i])
                        draws += 1
    # a fresh instance (another process) agrees; another step, round, user or seed gives another mask
    plan = make_plan(1, "user-0", seed=7, extra={"ratio": 0.5})
    assert tier_session("edge", plan).mask(3) == tier_session("cloud", plan).mask(3)
    others = [tier_session("user", make_plan(r, u, seed=s, extra={"ratio": 0.5})).mask(st)
              for r, u, s, st in ((1, "user-0", 7, 4), (2, "user-0", 7, 3), (1, "user-1", 7, 3), (1, "user-0", 8, 3))]
    assert any(m != tier_session("user", plan).mask(3) for m in others)
    # skipping grows with depth (p_l = 0.5 * 2l / 5, the deepest capped at 0.9); block 0 always runs
    rates = [skipped[i] / draws for i in range(6)]
    assert layer_ratios(0.5, 6, 0.9) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.9])
    assert rates[0] == 0.0 and rates[1] < rates[2] < rates[3] < rates[4] + rates[5]
    # each tier skips the sum of its blocks' p_l on average: user 0.2, edge exactly 1, cloud 1.7
    assert rates[0] + rates[1] == pytest.approx(0.2, abs=0.05) and rates[2] + rates[3] == 1.0
    assert rates[4] + rates[5] == pytest.approx(1.7, abs=0.1)


def test_a_fixed_count_caps_the_peak_and_independent_draws_do_not() -> None:
    probs = layer_ratios(0.5, 6, 0.9, personal=[5])  # the whole model on the device, its last block personal
    assert probs == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.0])
    whole = tier_ranges(None, 6)
    assert whole == [(0, 6)] and tier_ranges((6, 6), 6) == [(0, 6)] and tier_ranges((2, 4), 6) == [(0, 2), (2, 4), (4, 6)]
    fixed = [skip_mask(3, 1, "u", step, probs, whole) for step in range(300)]
    assert {sum(m) for m in fixed} == {2}  # sum p_l = 2: every step runs 4 of 6 blocks
    assert not any(m[0] or m[5] for m in fixed)  # block 0 (p = 0) and the personal block always run
    counts = [sum(m[i] for m in fixed) for i in range(6)]
    assert counts[1] < counts[2] < counts[3] < counts[4]  # depth-weighted
    independent = [skip_mask(3, 1, "u", step, probs) for step in range(300)]
    assert min(sum(m) for m in independent) == 0  # some step runs every block: the peak is the plain one
    assert sum(map(sum, independent)) / 300 == pytest.approx(2.0, abs=0.15)  # the same mean
    frac = [sum(skip_mask(3, 1, "u", step, layer_ratios(0.3, 6, 0.9), whole)) for step in range(400)]
    assert set(frac) == {1, 2} and sum(frac) / 400 == pytest.approx(1.8, abs=0.06)  # sum p_l = 1.8: 1 or 2, 1.8 on average
    # ratio 0: nothing is skipped
    assert tier_session("edge", make_plan(1, "u", extra={"ratio": 0.0})).layers_to_run(0) == [2, 3]
    # evaluation (where the hook is asked too) runs every block of the tier, whatever the ratio
    eval_plan = make_plan(1, "user-0", seed=7, extra={"ratio": 0.5}, mode="eval")
    assert all(tier_session(t, eval_plan).layers_to_run(s) == TIER_LAYERS[t] for t in TIER_LAYERS for s in range(20))


class RecordingDropPEFT(DropPEFTSession):
    """DropPEFT's session that records, per tier, the whole-model mask it derived and the blocks it ran (training)."""

    seen: list[tuple[str, str, int, int, tuple[bool, ...], tuple[int, ...]]] = []

    def layers_to_run(self, step):
        run = super().layers_to_run(step)
        if self.plan.training:  # the hook is asked in evaluation too; the masks are training's
            RecordingDropPEFT.seen.append((self.ctx.tier, self.plan.user_id, self.plan.round_id, step,
                                           tuple(self.mask(step)), tuple(run)))
        return run


register_algorithm("test-droppeft-recorder", config=DropPEFTConfig, strategy=DropPEFTStrategy, session=RecordingDropPEFT)


def test_sim_round_same_mask_on_every_tier_skipped_blocks_never_run_and_eval_runs_all(small_sim) -> None:
    sim = small_sim(algorithm="test-droppeft-recorder", config={"ratio": 0.5}, users=2, local_steps=4,
                    split=(1, 3), eval_examples_per_client=2)
    calls: Counter[tuple[int, str]] = Counter()
    for runtime in sim.runtimes.values():
        for index, block in runtime.partition.blocks.items():
            block.register_forward_hook(
                lambda m, a, o, i=int(index): calls.update([(i, "train" if torch.is_grad_enabled() else "eval")]))
    RecordingDropPEFT.seen.clear()
    sim.run_round()
    seen = list(RecordingDropPEFT.seen)
    by_step: dict[tuple[str, int], dict[str, tuple[bool, ...]]] = defaultdict(dict)
    ran: dict[tuple[str, int], list[int]] = defaultdict(list)
    for tier, user, _, step, mask, run in seen:
        by_step[(user, step)][tier] = mask
        ran[(user, step)] += run
    assert len(by_step) == 2 * 4
    kept = Counter()
    for key, masks in by_step.items():
        assert set(masks) == {"user", "edge", "cloud"}, key
        assert len(set(masks.values())) == 1, (key, masks)  # every tier saw the same mask
        mask = masks["cloud"]
        assert sorted(ran[key]) == [i for i in range(4) if not mask[i]]
        kept.update(i for i in range(4) if not mask[i])
    assert sum(len(by_step) - kept[i] for i in range(4)) > 0, "ratio 0.5 skipped nothing in 8 steps"
    # a skipped block is never called; evaluation (no grad) calls every block once per user and batch
    assert {i: calls[(i, "train")] for i in range(4)} == {i: kept[i] for i in range(4)}
    assert {i: calls[(i, "eval")] for i in range(4)} == {i: 2 for i in range(4)}


# --- online ratios: the bandit ------------------------------------------------------------------------


def test_ucb_converges_to_the_best_arm_deterministically() -> None:
    means = [0.2, 0.5, 0.8, 0.45, 0.3, 0.1]

    def play(seed: int) -> tuple[list[int], UCBPolicy]:
        policy, noise, arms = UCBPolicy(len(means), seed=seed), random.Random(seed), []
        for _ in range(400):
            arm = policy.select()
            arms.append(arm)
            policy.update(arm, means[arm] + noise.gauss(0, 0.2))
        return arms, policy

    arms, policy = play(3)
    assert play(3)[0] == arms  # deterministic under its seed
    assert sorted(arms[:6]) == list(range(6))  # every arm is tried once first
    assert policy.best() == 2
    assert Counter(arms[-100:]).most_common(1)[0][0] == 2
    assert policy.counts[2] > 0.6 * sum(policy.counts)


def true_rate(ratio: float) -> float:
    """Synthetic loss decrease per second: best at ratio 0.3 (cheaper steps against less progress per step)."""
    return 1.0 - 2.5 * abs(ratio - 0.3)


def _synthetic_metrics(round_id: int, ratio_of: dict[str, float], rng: random.Random) -> dict:
    """8 steps per user; progress per second is ``true_rate``, shrinking over rounds for every arm alike."""
    users = {}
    trend = 1.0 / (1.0 + round_id / 10)
    for user, ratio in ratio_of.items():
        step = 0.1 * (1.0 - 0.8 * ratio)
        losses = [2.0 - 0.1 * trend * true_rate(ratio) * step * s + rng.gauss(0, 0.0005) for s in range(8)]
        users[user] = {"losses": losses, "step_seconds": [step] * 8, "seconds": 8 * step}
    return {"users": users, "train_loss": 1.0}


def test_coordinator_assigns_each_user_a_ratio_and_learns_the_best_one() -> None:
    def run(seed: int) -> tuple[list[dict], DropPEFTStrategy]:
        algorithm = coordinator({"seed": seed, "reward": "own"})  # progress per second of the user's own time
        participants = [Participant(f"user-{i}", "edge-0", 10) for i in range(3)]
        rng, plans = random.Random(seed), []
        for round_id in range(1, 61):
            extras = algorithm.configure_round(round_id, participants)
            assert set(extras) == {"user-0", "user-1", "user-2"}
            assert all(e["ratio"] in algorithm.config.ratios for e in extras.values())
            plans.append(extras)
            algorithm.after_round(round_id, _synthetic_metrics(round_id, {u: e["ratio"] for u, e in extras.items()}, rng))
        return plans, algorithm

    plans, algorithm = run(0)
    assert run(0)[0] == plans  # same seed, same rewards: the same assignments
    best = max(algorithm.config.ratios, key=true_rate)
    assert best == 0.3
    for user in ("user-0", "user-1", "user-2"):
        policy = algorithm.policies[user]
        assert algorithm.config.ratios[policy.best()] == best
        assert Counter(p[user]["ratio"] for p in plans[-20:]).most_common(1)[0][0] == best
    assert {h["user"] for h in algorithm.history} == {"user-0", "user-1", "user-2"}
    fixed = coordinator({"ratio": 0.2}).configure_round(1, [Participant("u", "e", 1)])
    assert fixed == {"u": {"ratio": 0.2}}


def test_progress_is_the_drop_between_the_first_and_the_last_window_of_losses() -> None:
    assert progress([4.0, 3.0, 2.0, 1.0], 0.25) == pytest.approx(4 - 1)
    assert progress([4.0, 3.0, 2.0, 1.0], 0.5) == pytest.approx(3.5 - 1.5)
    assert progress([1.0], 0.25) is None
    with pytest.raises(ValueError, match="ratios"):
        coordinator({"ratios": [0.1, 1.0]})
    with pytest.raises(ValueError, match="personal_layers"):
        coordinator({"personal_layers": [-1]})
    with pytest.raises(ValueError, match="reward"):
        coordinator({"reward": "wall"})


def _straggler_metrics(ratio_of: dict[str, float], slowdown: dict[str, float], rng: random.Random) -> dict:
    """Dropping blocks costs progress (1 - 0.5 r) and saves time (1 - 0.8 r); user-2 is 4x slower."""
    users = {}
    for user, ratio in ratio_of.items():
        step = 0.1 * slowdown[user] * (1.0 - 0.8 * ratio)
        losses = [2.0 - 0.05 * (1.0 - 0.5 * ratio) * s + rng.gauss(0, 0.002) for s in range(8)]
        users[user] = {"losses": losses, "step_seconds": [step] * 8}
    return {"users": users}


@pytest.mark.parametrize("reward", ["round", "own"])
def test_the_round_time_reward_drops_blocks_on_the_straggler_only(reward: str) -> None:
    algorithm = coordinator({"seed": 1, "reward": reward})
    slowdown = {"user-0": 1.0, "user-1": 1.0, "user-2": 4.0}
    participants = [Participant(u, "edge-0", 10) for u in slowdown]
    rng, plans = random.Random(0), []
    for round_id in range(1, 81):
        extras = algorithm.configure_round(round_id, participants)
        plans.append(extras)
        algorithm.after_round(round_id, _straggler_metrics({u: e["ratio"] for u, e in extras.items()}, slowdown, rng))
    late = {u: Counter(p[u]["ratio"] for p in plans[-30:]).most_common(1)[0][0] for u in slowdown}
    if reward == "round":  # a fast device waits for the straggler anyway: it keeps every block
        assert late == {"user-0": 0.0, "user-1": 0.0, "user-2": 0.5}
    else:  # per second of its own, every device prefers the cheapest steps
        assert late == {"user-0": 0.5, "user-1": 0.5, "user-2": 0.5}
    entry = algorithm.history[-1]
    assert entry["round_seconds"] == max(h["seconds"] for h in algorithm.history if h["round"] == entry["round"])


# --- PTLS: personal layers -----------------------------------------------------------------------------


def test_build_adapters_uses_the_users_own_values_for_personal_keys_in_train_and_eval() -> None:
    state = {"blocks.2.q.lora_A.weight": torch.zeros(2, 3), "blocks.3.q.lora_A.weight": torch.zeros(2, 3)}
    plan = make_plan(1, "u", algorithm="droppeft", config={"personal_layers": [3]})
    edge = tier_session("edge", plan)
    params = edge.build_adapters(state)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    packed = edge.pack_update(params)
    assert torch.equal(packed["blocks.2.q.lora_A.weight"], torch.ones(2, 3))
    assert torch.equal(packed["blocks.3.q.lora_A.weight"], torch.zeros(2, 3))  # the download, not the personal value
    store = edge.ctx.store
    assert torch.equal(store["personal"]["u"]["blocks.3.q.lora_A.weight"], torch.ones(2, 3))
    for mode in ("train", "eval"):  # a later session of this user on this tier (same store) starts from its own
        again = tier_session("edge", make_plan(2, "u", mode=mode), {"personal_layers": [3]}, store=store)
        params = again.build_adapters(state)
        assert torch.equal(params["blocks.3.q.lora_A.weight"], torch.ones(2, 3))
        assert torch.equal(params["blocks.2.q.lora_A.weight"], torch.zeros(2, 3))
        other = tier_session("edge", make_plan(2, "v", mode=mode), {"personal_layers": [3]}, store=store)
        other = other.build_adapters(state)
        assert torch.equal(other["blocks.3.q.lora_A.weight"], torch.zeros(2, 3))  # another user: the global value


PERSONAL = [0, 2, 3]  # tiny-llama split (1, 3): block 0 on the user, 2 on the edge, 3 on the cloud


def test_personal_layers_stay_out_of_aggregation_on_every_tier_with_codecs(small_sim) -> None:
    sim = small_sim(algorithm="droppeft", config={"personal_layers": PERSONAL, "ratio": 0.1}, users=4,
                    edges=2, split=(1, 3), local_steps=3, user_edge_codecs="int8",
                    edge_cloud_codecs="uploads=fp16,downloads=fp16")
    initial = {t: {k: v.clone() for k, v in s.items()} for t, s in sim.coordinator.global_state.items()}
    rows = [sim.run_round() for _ in range(2)]
    assert all(r["eval_loss"] > 0 for r in rows)
    final = sim.coordinator.global_state
    moved = 0
    for tier, state in initial.items():
        for key, value in state.items():
            if block_of(key) in PERSONAL:
                assert torch.equal(final[tier][key], value), (tier, key)  # the global never moves
            elif ".lora_B." in key:
                moved += not torch.equal(final[tier][key], value)
    assert moved > 0
    users = [u.user_id for u in sim.users]
    for tier, block in (("user", 0), ("edge", 2), ("cloud", 3)):
        personal = sim.runtimes[tier].plugin_store["droppeft"]["personal"]
        assert sorted(personal) == sorted(users), tier
        keys = sorted(k for k in initial[tier] if block_of(k) == block)
        for user in users:
            assert sorted(personal[user]) == keys
            for key in keys:
                if ".lora_B." in key:  # each user's own value moved off the (zero) global one
                    assert torch.count_nonzero(personal[user][key]) > 0, (tier, user, key)
        b_key = next(k for k in keys if ".lora_B." in k)
        assert not torch.equal(personal[users[0]][b_key], personal[users[1]][b_key])  # personal, not shared


@pytest.mark.slow  # four real tier processes (cloud, edge, two users): about 25 s; run with `make test-slow`
def test_through_real_services_equals_the_simulator(tmp_path) -> None:
    """A droppeft round request through HTTP services (STLD at 0.5, a personal block per tier) gives the sim's state."""
    from shared.lab.cluster import Cluster
    from shared.lab.sim import SimConfig, Simulation

    config = {"ratio": 0.5, "personal_layers": [0, 2, 3]}  # a personal block on every tier
    args = ["--model", "tiny-bert", "--split", "1,3", "--data", "trec", "--local-steps", "3", "--batch-size", "4",
            "--max-examples-per-client", "16", "--eval-examples-per-client", "4", "--seed", "7"]
    cluster = Cluster(tmp_path / "cluster", args, users=2, edges=1)
    try:
        cluster.start()
        for expected in (1, 2):
            view = cluster.wait_round(cluster.start_round({"algorithm": "droppeft", "config": config}))
            assert view["state"] == "committed", view
            assert view["version"] == expected and view["request"]["algorithm"] == "droppeft"
        from safetensors.torch import load

        from shared.protocol.bundle import AdapterBundle

        served = AdapterBundle.from_tensors(load(cluster.get("/v1/adapters/2").content))
    finally:
        cluster.stop()
    sim = Simulation(SimConfig(model="tiny-bert", data="trec", users=2, edges=1, rounds=2, split=(1, 3),
                               max_examples_per_client=16, eval_examples_per_client=4, seed=7, baseline_eval=False,
                               round=RoundConfig(local_steps=3, batch_size=4, algorithm="droppeft", config=config)))
    sim.run()
    for tier, state in sim.coordinator.global_state.items():
        assert set(served[tier]) == set(state)
        for key, value in state.items():
            assert torch.equal(served[tier][key], value), (tier, key)


def test_the_benchmark_writes_its_report_and_plot(hermetic_cache, tmp_path) -> None:
    from shared.lab.bench.droppeft import main

    out, png = tmp_path / "droppeft.json", tmp_path / "droppeft.png"
    assert main(["--quick", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert set(report["settings"]) == {"whole", "split"}
    whole = report["settings"]["whole"]
    assert whole["split"] == [4, 4] and list(whole["methods"]) == ["plain", "droppeft"]
    run = whole["methods"]["droppeft"]["runs"][0]
    assert all(r["virtual_seconds"] > 0 and r["ratios"] for r in run["rounds"])
    fixed, independent = (whole["memory"]["by_ratio"][k]["0.5"] for k in ("fixed", "independent"))
    assert fixed["min_blocks_run"] == fixed["max_blocks_run"] == 3  # 4 blocks, the last personal: 1 skipped each step
    assert whole["peak_reduction"]["fixed"]["0.5"] > 0.15 and whole["ceiling"]["compute_only"] > 1
    assert {"speedup", "accuracy_delta_points", "per_seed"} <= set(whole)
    assert png.stat().st_size > 0


def test_one_devices_reported_seconds_cannot_scale_the_others_rewards() -> None:
    def rewards(hostile: dict[str, Any]) -> dict[str, float]:
        algorithm = coordinator({"seed": 0, "reward": "round"})
        participants = [Participant(f"user-{i}", "edge-0", 10) for i in range(4)]
        extras = algorithm.configure_round(1, participants)
        metrics = _synthetic_metrics(1, {u: e["ratio"] for u, e in extras.items()}, random.Random(0))
        metrics["users"]["user-3"].update(hostile)
        algorithm.after_round(1, metrics)
        return {h["user"]: h["reward"] for h in algorithm.history}

    honest = rewards({})
    for claim in ({"step_seconds": [1e300] * 8}, {"step_seconds": [math.inf] * 8}, {"step_seconds": "slow"},
                  {"losses": "not a list"}, {"losses": [math.nan] * 8}):
        got = rewards(claim)
        for user in ("user-0", "user-1", "user-2"):  # at most the cap's factor of 10 below their honest reward
            assert math.isfinite(got[user]) and abs(got[user]) >= abs(honest[user]) / 10.5, (claim, got)
