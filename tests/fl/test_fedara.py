"""FedARA: SVD adapters, the penalty, importance scores, the budget schedule, masks on every tier, pruning, bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from shared.model.adapters import initial_state
from shared.fl.aggregation import AdapterUpdate
from shared.fl import RoundPlan, create_algorithm
from shared.fl.fedara import (INDEX, SAMPLES, SCORE, FedARA, FedARAConfig, ImportanceTracker, budget_schedule, masked_state, orthogonality_penalty, triplet_scores)
from shared.config.model_spec import ModelSpec
from shared.runtime.tier import TierRuntime

MODULE = "blocks.3.attention.self.query"  # a cloud-tier module of tiny-bert at split (1, 3)
PRUNED = ("blocks.0.attention.self.value", "blocks.2.attention.self.query", "blocks.3.attention.self.value")


def sim_settings(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(model="tiny-bert", data="trec", users=4, edges=2, rounds=1, split=(1, 3),
                                    local_steps=2, batch_size=4, max_len=16, max_examples_per_client=8,
                                    eval_examples_per_client=4, adapter="svd", algorithm="fedara", baseline_eval=False)
    settings.update(overrides)
    return settings


def make_sim(**overrides: Any):
    from shared.lab.sim import SimConfig, Simulation

    return Simulation(SimConfig(**sim_settings(**overrides)))


def coordinator_algorithm(sim) -> FedARA:
    return sim.coordinator.algorithm_for(sim.request())


def half_masks(sim) -> dict[str, list[int]]:
    """Even triplets of every module, none of the PRUNED ones (one per tier)."""
    modules = sorted({k.rsplit(".", 1)[0] for t in sim.coordinator.global_state.values() for k in t if ".lora_" in k})
    return {m: ([] if m in PRUNED else [0, 2, 4, 6]) for m in modules}


def start_update_bytes(sim) -> int:
    total = 0
    for link in sim.user_links + sim.edge_links:
        by = link.stats.snapshot()["by_endpoint"]
        total += sum(sum(by.get(e, [0, 0, 0])[:2]) for e in ("start", "update"))
    return total


# --- SVD adapters ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_runtime(tiny) -> TierRuntime:
    spec = ModelSpec(model="tiny-bert", split=(1, 3), task="cls", num_labels=6, adapter="svd")
    return TierRuntime("cloud", tiny("tiny-bert"), spec)


def _cloud_logits(runtime: TierRuntime, state: dict[str, torch.Tensor], user: str) -> torch.Tensor:
    plan = RoundPlan(round_id=1, user_id=user, algorithm="fedara", mode="eval")
    session = runtime.open_session(plan, state)
    torch.manual_seed(0)
    hidden, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.uint8)
    out = runtime.head(session, runtime.forward(session, hidden, mask, 0), mask)
    runtime.close_session(1, user)
    return out


def test_zero_initialised_e_gives_the_base_models_output(cloud_runtime) -> None:
    state = initial_state(cloud_runtime.slots.shapes(), seed=3, kind="svd")
    assert all(not v.any() for k, v in state.items() if k.endswith(".lora_E"))
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith((".lora_A", ".lora_B")))  # P, Q random
    base_only = {k: v for k, v in state.items() if ".lora_" not in k}  # every adapter layer switched off
    with_svd = _cloud_logits(cloud_runtime, state, "a")
    assert torch.equal(with_svd, _cloud_logits(cloud_runtime, base_only, "b"))
    bumped = {k: (v + 0.5 if k.endswith(".lora_E") else v) for k, v in state.items()}
    assert not torch.allclose(_cloud_logits(cloud_runtime, bumped, "c"), with_svd)  # e != 0 does change it


def test_a_pruned_module_is_switched_off_and_costs_no_adapter_compute(cloud_runtime) -> None:
    state = initial_state(cloud_runtime.slots.shapes(), seed=3, kind="svd")
    state = {k: (v + 1.0 if k.endswith(".lora_E") else v) for k, v in state.items()}  # adapters that matter
    plan = RoundPlan(round_id=1, user_id="p", algorithm="fedara", extra={"active": {MODULE: []}}, mode="eval")
    session = cloud_runtime.open_session(plan, state)
    assert not any(k.startswith(MODULE + ".") for k in session.params)
    layer = cloud_runtime.slots.layer_of[MODULE + ".lora_A"]
    other = cloud_runtime.slots.layer_of["blocks.3.attention.self.value.lora_A"]
    calls = {"pruned": 0, "other": 0}
    hooks = [layer.lora_dropout["default"].register_forward_hook(lambda *a: calls.__setitem__("pruned", calls["pruned"] + 1)),
             other.lora_dropout["default"].register_forward_hook(lambda *a: calls.__setitem__("other", calls["other"] + 1))]
    try:
        hidden, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.uint8)
        cloud_runtime.forward(session, hidden, mask, 0)
        assert layer._disable_adapters and not other._disable_adapters
        assert calls == {"pruned": 0, "other": 1}  # the pruned layer's low-rank path never ran
        x = torch.randn(3, 32)
        assert torch.equal(layer(x), layer.base_layer(x))
    finally:
        for h in hooks:
            h.remove()
        cloud_runtime.close_session(1, "p")


# --- the orthogonality penalty -------------------------------------------------------------------------------


def test_orthogonality_penalty_value_and_gradient() -> None:
    torch.manual_seed(0)
    P = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    Q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(3, dtype=torch.float64)
    value = orthogonality_penalty(P, Q)
    expected = torch.linalg.matrix_norm(P.T @ P - eye) ** 2 + torch.linalg.matrix_norm(Q @ Q.T - eye) ** 2
    assert torch.allclose(value, expected)
    gP, gQ = torch.autograd.grad(value, (P, Q))
    with torch.no_grad():  # d/dP ||P^T P - I||^2 = 4 P (P^T P - I); d/dQ ||Q Q^T - I||^2 = 4 (Q Q^T - I) Q
        assert torch.allclose(gP, 4 * P @ (P.T @ P - eye))
        assert torch.allclose(gQ, 4 * (Q @ Q.T - eye) @ Q)
    assert torch.autograd.gradcheck(orthogonality_penalty, (P, Q))  # finite differences
    Pq, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    assert float(orthogonality_penalty(Pq, Pq.T)) < 1e-20  # orthonormal factors cost nothing


def test_extra_loss_sums_the_active_modules_with_the_configured_weight() -> None:
    algorithm = create_algorithm("fedara", {"ortho_weight": 0.25})
    torch.manual_seed(1)
    params = {f"m{i}.lora_{n}": torch.nn.Parameter(torch.randn(*s)) for i in range(2)
              for n, s in (("A", (2, 4)), ("B", (6, 2)), ("E", (2, 1)))}
    algorithm.indices = {"m0": [0, 5], "m1": [1, 2]}
    loss = algorithm.extra_loss("edge", params, RoundPlan(1, "u"))
    want = 0.25 * sum(orthogonality_penalty(params[f"m{i}.lora_B"], params[f"m{i}.lora_A"]) for i in range(2))
    assert torch.allclose(loss, want)
    loss.backward()
    assert params["m0.lora_A"].grad is not None and params["m0.lora_E"].grad is None  # e is not penalised
    assert create_algorithm("fedara", {"ortho_weight": 0}).extra_loss("edge", params, RoundPlan(1, "u")) is None


# --- importance scores ----------------------------------------------------------------------------------------


def test_importance_is_the_smoothed_sensitivity_times_its_uncertainty() -> None:
    tracker = ImportanceTracker(beta1=0.8, beta2=0.6)
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    grads = [torch.tensor([[0.5, 1.0], [-2.0, 0.0]]), torch.tensor([[1.0, -1.0], [1.0, 1.0]])]
    ibar = torch.zeros(2, 2)
    ubar = torch.zeros(2, 2)
    for g in grads:
        w.grad = g
        tracker.update("w", w)
        sens = (w.detach() * g).abs()
        ibar = 0.8 * ibar + 0.2 * sens
        ubar = 0.6 * ubar + 0.4 * (sens - ibar).abs()
    assert torch.allclose(tracker.entry_scores("w", w), ibar * ubar)
    s_q, s_p, s_e = torch.rand(3, 4), torch.rand(5, 3), torch.rand(3, 1)
    combined = triplet_scores(s_q, s_p, s_e)
    for i in range(3):
        assert torch.isclose(combined[i], s_e[i, 0] + s_q[i].mean() + s_p[:, i].mean())


def test_scores_are_computed_after_backward_and_sent_with_the_update() -> None:
    algorithm = create_algorithm("fedara", {"beta1": 0.5, "beta2": 0.5})
    torch.manual_seed(2)
    state = {"m.lora_A": torch.randn(4, 3), "m.lora_B": torch.randn(5, 4), "m.lora_E": torch.randn(4, 1),
             "head.w": torch.randn(2)}
    plan = RoundPlan(1, "u", extra={"active": {"m": [1, 3]}})
    params = algorithm.build_adapters("edge", state, plan)
    assert params["m.lora_A"].shape == (2, 3) and torch.equal(params["m.lora_A"], state["m.lora_A"][[1, 3]])
    assert torch.equal(params["m.lora_B"], state["m.lora_B"][:, [1, 3]])
    x = torch.randn(7, 3)
    for _ in range(2):
        loss = (x @ (params["m.lora_A"] * params["m.lora_E"]).T @ params["m.lora_B"].T).square().mean()
        loss = loss + params["head.w"].sum()
        loss.backward()
        algorithm.after_backward("edge", params, plan)
        for p in params.values():
            p.grad = None
    update = algorithm.pack_update("edge", params, plan)
    assert update["m" + INDEX].tolist() == [1, 3] and update["m" + SCORE].shape == (2,)
    t = algorithm.tracker
    want = triplet_scores(t.entry_scores("m.lora_A", params["m.lora_A"]), t.entry_scores("m.lora_B", params["m.lora_B"]),
                          t.entry_scores("m.lora_E", params["m.lora_E"]))
    assert torch.allclose(update["m" + SCORE], want) and bool((want > 0).all())
    assert "head.w" + SCORE not in update and set(t.ipt) == {"m.lora_A", "m.lora_B", "m.lora_E"}  # heads are not scored


# --- the budget schedule -----------------------------------------------------------------------------------------


def test_budget_schedule_warms_up_decays_cubically_and_reaches_the_target() -> None:
    total, warmup, final, b0, bt = 10, 2, 2, 96, 32
    values = [budget_schedule(t, total, warmup, final, b0, bt) for t in range(1, total + 3)]
    assert values[:2] == [b0, b0]  # warm-up rounds
    assert values[8:] == [bt] * 4  # the final rounds (and beyond)
    decay = 6  # rounds 3..8
    for t in range(3, 9):
        want = bt + (b0 - bt) * (1 - (t - warmup) / (decay + 1)) ** 3
        assert values[t - 1] == round(want)
    assert b0 > values[2] > values[6] > bt  # strictly inside while decaying
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone
    assert values[4] == round(bt + (b0 - bt) * (4 / 7) ** 3)  # mid-way: 48
    assert budget_schedule(2, 3, 1, 2, 10, 4) == 4  # no decay rounds: straight to the target


@pytest.mark.parametrize("bad", [{"warmup_rounds": 6, "final_rounds": 5}, {"target_rank": 0}, {"beta1": 1.0},
                                 {"init_rank": 4, "target_rank": 5}, {"ortho_weight": -1}, {"rank": 3}])
def test_config_is_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FedARAConfig.from_dict(bad)


def test_after_round_keeps_the_best_scored_triplets_within_the_budget() -> None:
    algorithm = create_algorithm("fedara", {"total_rounds": 3, "warmup_rounds": 1, "final_rounds": 1,
                                            "target_rank": 1})
    algorithm.full_rank = {"a": 4, "b": 4}
    algorithm.round_scores = {"a": torch.tensor([4.0, 3.0, float("nan"), 0.5]), "b": torch.tensor([0.0, 9.0, 1.0, 0.1])}
    algorithm.after_round(1, {})  # round 2 of 3: bT + (b0 - bT) * (1 - 1/2)^3 = 2 + 6/8 -> 3
    assert algorithm.active == {"a": [0, 1], "b": [1]}
    algorithm.round_scores = {"a": torch.tensor([0.1, 7.0, 5.0, 5.0]), "b": torch.tensor([1.0, 2.0, 1.0, 1.0])}
    metrics: dict[str, Any] = {}
    algorithm.after_round(2, metrics)  # target 2; masked triplets never come back, whatever their score
    assert algorithm.active == {"a": [1], "b": [1]} and metrics["fedara"]["active"] == 2
    extras = algorithm.configure_round(3, [type("P", (), {"user_id": "u"})()])
    assert json.loads(json.dumps(extras))["u"]["active"] == {"a": [1], "b": [1]}  # msgpack/JSON-native


# --- aggregation ------------------------------------------------------------------------------------------------


def _factors(rank: int, value: float, d: int = 3, n: int = 2) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((rank, n), value), "m.lora_B": torch.full((d, rank), value),
            "m.lora_E": torch.full((rank, 1), value)}


def _update(source: str, idx: list[int], value: float, samples: int, score: float = 1.0) -> AdapterUpdate:
    state = _factors(len(idx), value)
    state["m" + INDEX] = torch.tensor(idx)
    state["m" + SCORE] = torch.full((len(idx),), score)
    return AdapterUpdate(source, "edge", state, samples)


def test_rank_aware_aggregation_weighs_each_triplet_by_the_samples_that_hold_it() -> None:
    algorithm = create_algorithm("fedara")
    previous = {**_factors(4, -1.0), "head.w": torch.zeros(2)}
    previous["m.lora_A"][3] = 7.0  # a triplet nobody trains keeps its value
    algorithm.active = {"m": [0, 1, 2]}
    u1, u2 = _update("u1", [0, 1], 1.0, 1, score=2.0), _update("u2", [1, 2], 4.0, 3, score=6.0)
    u1.state["head.w"], u2.state["head.w"] = torch.ones(2), torch.full((2,), 5.0)
    for u in (u1, u2):
        algorithm.validate_update("edge", u.state, previous, u.source)
    out = algorithm.aggregate("edge", [u1, u2], previous)
    assert set(out) == set(previous)  # full tensors, extras stripped
    assert out["m.lora_A"][:, 0].tolist() == [1.0, (1 * 1 + 4 * 3) / 4, 4.0, 7.0]
    assert out["m.lora_B"][0].tolist() == [1.0, 13 / 4, 4.0, -1.0] and out["m.lora_E"][:, 0].tolist() == [1.0, 13 / 4, 4.0, -1.0]
    assert torch.equal(out["head.w"], torch.full((2,), 4.0))
    scores = algorithm.round_scores["m"]
    assert scores[:3].tolist() == [2.0, (2 + 18) / 4, 6.0] and torch.isnan(scores[3])


def test_edge_pre_aggregation_stays_compact_and_carries_per_triplet_samples() -> None:
    edge = create_algorithm("fedara")  # a fresh instance, as the edge makes one
    download = _factors(3, -1.0)
    download["m" + INDEX] = torch.tensor([1, 4, 6])
    out = edge.aggregate("edge", [_update("u1", [1, 4], 2.0, 2), _update("u2", [4], 5.0, 6)], download)
    assert out["m" + INDEX].tolist() == [1, 4] and out["m.lora_A"].shape == (2, 2)  # triplet 6: nobody trained it
    assert out["m.lora_A"][:, 0].tolist() == [2.0, (2 * 2 + 5 * 6) / 8] and out["m" + SAMPLES].tolist() == [2.0, 8.0]
    cloud = create_algorithm("fedara")
    cloud.active = {"m": [1, 4, 6]}
    previous = _factors(8, 0.0)
    cloud.validate_update("edge", out, previous, "edge-0")
    other = _update("e1", [4, 6], 10.0, 4)
    merged = cloud.aggregate("edge", [AdapterUpdate("e0", "edge", out, 8), other], previous)
    col = merged["m.lora_A"][:, 0]
    assert col[1] == 2.0 and col[4] == pytest.approx((4.25 * 8 + 10 * 4) / 12) and col[6] == 10.0  # samples per triplet
    assert col[[0, 2, 3, 5, 7]].abs().sum() == 0


@pytest.mark.parametrize("case", ["not sent", "pruned", "bad shape", "no score", "negative score", "unsorted"])
def test_validate_update_refuses_what_cannot_join(case: str) -> None:
    algorithm = create_algorithm("fedara")
    algorithm.active = {"m": [0, 2, 3], "n": []}
    previous = {**_factors(4, 0.0), **{k.replace("m.", "n."): v for k, v in _factors(4, 0.0).items()}}
    update = _update("u", [0, 2], 1.0, 1).state
    if case == "not sent":
        update["m" + INDEX] = torch.tensor([0, 1])
    elif case == "pruned":
        update.update({k.replace("m.", "n."): v for k, v in update.items()})
    elif case == "bad shape":
        update["m.lora_B"] = torch.zeros(3, 4)
    elif case == "no score":
        del update["m" + SCORE]
    elif case == "negative score":
        update["m" + SCORE] = -update["m" + SCORE]
    else:
        update["m" + INDEX] = torch.tensor([2, 0])
    with pytest.raises(ValueError, match="update from u"):
        algorithm.validate_update("edge", update, previous, "u")


# --- through the runtime: masks on every tier, untouched masked triplets, fewer bytes ---------------------------


@pytest.fixture(scope="module")
def masked_round(hermetic_cache) -> dict[str, Any]:
    """One round with half the triplets of every module masked and one module per tier pruned, and one without."""
    full = make_sim()
    full.run_round()
    sim = make_sim()
    algorithm = coordinator_algorithm(sim)
    masks = half_masks(sim)
    algorithm.active = {m: list(v) for m, v in masks.items()}
    before = {t: {k: v.clone() for k, v in s.items()} for t, s in sim.coordinator.global_state.items()}
    built: list[tuple[str, str, dict[str, torch.Tensor]]] = []
    packed: list[tuple[str, dict[str, torch.Tensor]]] = []
    original_build, original_pack = FedARA.build_adapters, FedARA.pack_update

    def build(self, tier, state, plan):
        params = original_build(self, tier, state, plan)
        built.append((tier, plan.mode, {k: p.detach().clone() for k, p in params.items()}))
        return params

    def pack(self, tier, params, plan):
        out = original_pack(self, tier, params, plan)
        packed.append((tier, {k: v.clone() for k, v in out.items()}))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(FedARA, "build_adapters", build)
    mp.setattr(FedARA, "pack_update", pack)
    try:
        row = sim.run_round()
    finally:
        mp.undo()
    return {"sim": sim, "full": full, "masks": masks, "before": before, "built": built, "packed": packed, "row": row}


def test_masked_triplets_are_absent_from_the_sessions_on_every_tier(masked_round) -> None:
    masks, before = masked_round["masks"], masked_round["before"]
    built = masked_round["built"]
    assert {(t, m) for t, m, _ in built} == {(t, m) for t in ("user", "edge", "cloud") for m in ("train", "eval")}
    for tier, mode, params in built:
        modules = {k.rsplit(".", 1)[0] for k in params if ".lora_" in k}
        assert modules == {m for m in masks if m.startswith(tuple(f"blocks.{i}." for i in
                                                             {"user": [0], "edge": [1, 2], "cloud": [3]}[tier]))} - set(PRUNED)
        for module in modules:
            idx = masks[module]
            assert params[module + ".lora_A"].shape[0] == params[module + ".lora_E"].shape[0] == len(idx)
            assert params[module + ".lora_B"].shape[1] == len(idx)
            if mode == "train":  # the replica starts from the global values of the active triplets
                assert torch.equal(params[module + ".lora_A"], before[tier][module + ".lora_A"][idx])
        if tier == "cloud":
            assert "head.classifier.weight" in params


def test_masked_triplets_keep_their_global_values_and_active_ones_train(masked_round) -> None:
    masks, before = masked_round["masks"], masked_round["before"]
    after = masked_round["sim"].coordinator.global_state
    for tier, state in after.items():
        assert set(state) == set(before[tier]) and all(state[k].shape == before[tier][k].shape for k in state)
        for key, value in state.items():
            if ".lora_" not in key:
                continue
            module, kind = key.rsplit(".", 1)
            idx = masks[module]
            masked = [i for i in range(8) if i not in idx]
            dim = 1 if kind == "lora_B" else 0
            assert torch.equal(value.index_select(dim, torch.tensor(masked)),
                               before[tier][key].index_select(dim, torch.tensor(masked))), key
            if idx and kind == "lora_E":
                assert not torch.equal(value[idx], before[tier][key][idx]), key
    exported = masked_state(after["edge"], masks)  # the model FedARA trains, for export: masked e set to zero
    key = "blocks.1.attention.self.query.lora_E"
    assert exported[key][[1, 3, 5, 7]].abs().sum() == 0 and torch.equal(exported[key][[0, 2]], after["edge"][key][[0, 2]])


def test_updates_are_compact_and_a_half_masked_round_moves_clearly_fewer_bytes(masked_round) -> None:
    masks = masked_round["masks"]
    for tier, update in masked_round["packed"]:
        for key, value in update.items():
            if ".lora_" in key or key.endswith((INDEX, SCORE)):
                module = key.rsplit(".", 1)[0]
                k = len(masks[module])
                assert k > 0 and module not in PRUNED
                assert value.shape[1 if key.endswith(".lora_B") else 0] == k, key
    masked, full = start_update_bytes(masked_round["sim"]), start_update_bytes(masked_round["full"])
    assert masked < 0.7 * full, (masked, full)


def test_rounds_shrink_the_budget_and_prune_modules_end_to_end(hermetic_cache) -> None:
    sim = make_sim(rounds=3, algorithm_config={"total_rounds": 3, "warmup_rounds": 1, "final_rounds": 1,
                                               "target_rank": 0.5})
    moved = []
    for _ in range(3):
        before = start_update_bytes(sim)
        assert sim.run_round()["eval_accuracy"] is not None
        moved.append(start_update_bytes(sim) - before)
    history = coordinator_algorithm(sim).history
    assert [h["budget"] for h in history] == [12, 4, 4]  # 8 modules x 8 triplets -> 4 + 60 / 8 -> 4
    assert [h["active"] for h in history] == [12, 4, 4] and len(history[-1]["pruned_modules"]) >= 4
    assert moved[0] > moved[1] > moved[2]  # adapter traffic follows the budget


def test_a_lora_deployment_refuses_fedara_with_a_clear_error(hermetic_cache) -> None:
    sim = make_sim(adapter="lora")
    with pytest.raises(RuntimeError, match="failed: ValueError: fedara trains truncated-SVD adapters.*--adapter svd"):
        sim.run_round()
    assert sim.coordinator.version == 0


def test_the_cli_runs_fedara(hermetic_cache, capsys) -> None:
    from shared.lab.cli import build_parser

    args = build_parser().parse_args([
        "sim", "--model", "tiny-bert", "--data", "trec", "--users", "2", "--edges", "1", "--rounds", "1",
        "--split", "1,3", "--local-steps", "1", "--batch-size", "2", "--max-len", "16", "--max-examples", "4",
        "--eval-examples", "2", "--adapter", "svd", "--algorithm", "fedara",
        "--algorithm-config", '{"total_rounds": 2, "final_rounds": 1}'])
    assert args.func(args) == 0
    assert "acc" in capsys.readouterr().out


def test_the_benchmark_writes_its_report_and_plot(hermetic_cache, tmp_path) -> None:
    from shared.lab.bench.fedara import main

    out, png = tmp_path / "fedara.json", tmp_path / "fedara.png"
    assert main(["--model", "tiny-bert", "--users", "2", "--edges", "1", "--rounds", "2", "--local-steps", "1",
                 "--batch-size", "2", "--max-len", "16", "--max-examples", "4", "--eval-examples", "2",
                 "--final-rounds", "1", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["runs"]] == ["lora", "fedara"]
    for run in report["runs"]:
        assert {"final_accuracy", "adapter_bytes", "seconds", "rounds"} <= set(run)
        assert [r["round"] for r in run["rounds"]] == [0, 1, 2] and run["adapter_bytes"] > 0
        assert run["rounds"][-1]["cumulative_adapter_bytes"] == run["adapter_bytes"]
    assert {"bytes_ratio", "accuracy_delta_points", "target_met"} <= set(report)
    assert png.stat().st_size > 0
