"""FedARA: SVD adapters, the penalty, importance scores, the budget schedule, rank-aware aggregation and checks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from plans import make_plan
from shared.config.deployment import ModelSpec
from shared.fl import SessionContext, StrategyContext, get_algorithm
from shared.fl.aggregation import AdapterUpdate
from shared.fl.fedara import FedARAConfig, FedARASession, FedARAStrategy
from shared.fl.svd import (INDEX, SAMPLES, SCORE, ImportanceTracker, budget_schedule, orthogonality_penalty,
                           triplet_scores)
from shared.model.adapters import initial_state
from shared.protocol.enums import Tier
from shared.protocol.messages import RoundPlan
from shared.runtime.tier import TierRuntime

MODULE = "blocks.3.attention.self.query"  # a cloud-tier module of tiny-bert at split (1, 3)


def strategy(config: dict | None = None, tier: Tier = Tier.CLOUD) -> FedARAStrategy:
    """FedARA's coordinator side: the cloud's (kept across rounds) or an edge's (one per round)."""
    return get_algorithm("fedara").strategy(config, StrategyContext(tier))


def session(config: dict | None = None, plan: RoundPlan | None = None,
            state: dict[str, torch.Tensor] | None = None) -> FedARASession:
    """FedARA's session plug-in on an edge whose adapter slots are shaped like ``state``."""
    shapes = {k: tuple(v.shape) for k, v in (state or {}).items()}
    ctx = SessionContext(Tier.EDGE, plan or make_plan(), [1, 2], 4, None, shapes)
    return get_algorithm("fedara").session(config, ctx)


# --- SVD adapters ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_runtime(tiny) -> TierRuntime:
    spec = ModelSpec(model="tiny-bert", split=(1, 3), task="cls", num_labels=6, adapter="svd")
    return TierRuntime("cloud", tiny("tiny-bert"), spec)


def _cloud_logits(runtime: TierRuntime, state: dict[str, torch.Tensor], user: str) -> torch.Tensor:
    plan = make_plan(1, user, algorithm="fedara", mode="eval")
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
    plan = make_plan(1, "p", algorithm="fedara", extra={"active": {MODULE: []}}, mode="eval")
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
    algorithm = session({"ortho_weight": 0.25})
    torch.manual_seed(1)
    params = {f"m{i}.lora_{n}": torch.nn.Parameter(torch.randn(*s)) for i in range(2)
              for n, s in (("A", (2, 4)), ("B", (6, 2)), ("E", (2, 1)))}
    algorithm.indices = {"m0": [0, 5], "m1": [1, 2]}
    loss = algorithm.extra_loss(params)
    want = 0.25 * sum(orthogonality_penalty(params[f"m{i}.lora_B"], params[f"m{i}.lora_A"]) for i in range(2))
    assert torch.allclose(loss, want)
    loss.backward()
    assert params["m0.lora_A"].grad is not None and params["m0.lora_E"].grad is None  # e is not penalised
    assert session({"ortho_weight": 0}).extra_loss(params) is None


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
    torch.manual_seed(2)
    state = {"m.lora_A": torch.randn(4, 3), "m.lora_B": torch.randn(5, 4), "m.lora_E": torch.randn(4, 1),
             "head.w": torch.randn(2)}
    algorithm = session({"beta1": 0.5, "beta2": 0.5}, make_plan(1, "u", extra={"active": {"m": [1, 3]}}), state)
    params = algorithm.build_adapters(state)
    assert params["m.lora_A"].shape == (2, 3) and torch.equal(params["m.lora_A"], state["m.lora_A"][[1, 3]])
    assert torch.equal(params["m.lora_B"], state["m.lora_B"][:, [1, 3]])
    x = torch.randn(7, 3)
    for _ in range(2):
        loss = (x @ (params["m.lora_A"] * params["m.lora_E"]).T @ params["m.lora_B"].T).square().mean()
        loss = loss + params["head.w"].sum()
        loss.backward()
        algorithm.after_backward(params)
        for p in params.values():
            p.grad = None
    update = algorithm.pack_update(params)
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
    algorithm = strategy({"total_rounds": 3, "warmup_rounds": 1, "final_rounds": 1, "target_rank": 1,
                          "score_beta": 0.0})  # no smoothing: the ranking is this round's scores
    algorithm.full_rank, algorithm.tier_of = {"a": 4, "b": 4}, {"a": "user", "b": "user"}
    algorithm.round_scores = {"a": torch.tensor([4.0, 3.0, float("nan"), 0.5]), "b": torch.tensor([0.0, 9.0, 1.0, 0.1])}
    algorithm.after_round(1, {})  # round 2 of 3: bT + (b0 - bT) * (1 - 1/2)^3 = 2 + 6/8 -> 3
    assert algorithm.active == {"a": [0, 1], "b": [1]}
    algorithm.round_scores = {"a": torch.tensor([0.1, 7.0, float("nan"), float("nan")]),
                              "b": torch.tensor([float("nan"), 2.0, float("nan"), float("nan")])}
    metrics: dict[str, Any] = {}
    algorithm.after_round(2, metrics)  # target 2: masked triplets carried at (0.1 + 7 + 2) / (4 + 3 + 9) stay below
    assert algorithm.active == {"a": [1], "b": [1]} and metrics["fedara"]["active"] == 2
    extras = algorithm.configure_round(3, [type("P", (), {"user_id": "u"})()])
    assert json.loads(json.dumps(extras))["u"]["active"] == {"a": [1], "b": [1]}  # msgpack/JSON-native


def test_a_masked_triplet_revives_when_an_active_one_falls_behind_its_tier() -> None:
    algorithm = strategy({"total_rounds": 8, "warmup_rounds": 1, "final_rounds": 7, "target_rank": 1,
                          "score_beta": 0.5})
    algorithm.full_rank, algorithm.tier_of = {"a": 3, "b": 2}, {"a": "user", "b": "user"}
    nan = float("nan")
    algorithm.round_scores = {"a": torch.tensor([1.0, 8.0, 4.0]), "b": torch.tensor([6.0, 2.0])}
    algorithm.after_round(1, {})
    assert algorithm.active == {"a": [1], "b": [0]}  # the tier's 2 best of 5
    algorithm.round_scores = {"a": torch.tensor([nan, 0.2, nan]), "b": torch.tensor([6.0, nan])}
    algorithm.after_round(2, {})
    # masked averages move as far as the held ones' averages did: (4.1 + 6) / (8 + 6) of what they were
    trend = 0.5 + 0.5 * (0.2 + 6) / (8 + 6)
    assert trend == pytest.approx((4.1 + 6) / 14)
    assert algorithm.scores["a"].tolist() == pytest.approx([trend, 4.1, 4 * trend])
    assert algorithm.scores["b"].tolist() == pytest.approx([6.0, 2 * trend])
    assert algorithm.active == {"a": [1], "b": [0]}  # the fallen triplet's average still leads
    revived = []
    for round_id in range(3, 8):
        metrics: dict[str, Any] = {}
        algorithm.round_scores = {m: torch.where(torch.tensor([i in algorithm.active[m] for i in range(r)]),
                                                 torch.tensor({"a": [nan, 0.2, 3.0], "b": [6.0, nan]}[m]),
                                                 torch.tensor(nan)) for m, r in algorithm.full_rank.items()}
        algorithm.after_round(round_id, metrics)
        revived.append(metrics["fedara"]["revived"])
    assert algorithm.active == {"a": [2], "b": [0]} and sum(revived) == 1  # triplet 2 of a came back, once


def test_a_uniform_rise_of_the_scores_revives_nothing() -> None:
    # while e grows from 0 every score rises round on round: a masked triplet tied with a kept one stays tied
    algorithm = strategy({"total_rounds": 4, "warmup_rounds": 1, "final_rounds": 3, "target_rank": 1,
                          "score_beta": 0.5})
    algorithm.full_rank, algorithm.tier_of = {"a": 2}, {"a": "user"}
    algorithm.round_scores = {"a": torch.tensor([2.0, 1.5])}
    algorithm.after_round(1, {})
    assert algorithm.active == {"a": [0]}
    metrics: dict[str, Any] = {}
    algorithm.round_scores = {"a": torch.tensor([20.0, float("nan")])}  # the kept triplet's score rose 10-fold
    algorithm.after_round(2, metrics)
    assert algorithm.scores["a"].tolist() == pytest.approx([11.0, 8.25])  # both averages moved 5.5-fold
    assert algorithm.active == {"a": [0]} and metrics["fedara"]["revived"] == 0


def test_each_budgeted_tier_ranks_its_own_triplets_and_the_cloud_keeps_its_rank() -> None:
    algorithm = strategy({"total_rounds": 2, "warmup_rounds": 0, "final_rounds": 2, "target_rank": 1})
    algorithm.full_rank = {"u": 2, "e1": 2, "e2": 2, "c": 2}
    algorithm.tier_of = {"u": "user", "e1": "edge", "e2": "edge", "c": "cloud"}
    algorithm.round_scores = {"u": torch.tensor([1e-6, 2e-6]), "e1": torch.tensor([3e-3, 1e-3]),
                              "e2": torch.tensor([2e-3, 4e-3]), "c": torch.tensor([9.0, 0.0])}
    assert algorithm.budgets() == {"user": (2, 1), "edge": (4, 2)}
    metrics: dict[str, Any] = {}
    algorithm.after_round(1, metrics)
    # a global ranking would keep the cloud's and the edge's triplets and prune the user tier entirely
    assert algorithm.active == {"u": [1], "e1": [0], "e2": [1], "c": [0, 1]}
    assert metrics["fedara"]["budget"] == {"user": 1, "edge": 2}
    assert metrics["fedara"]["active_by_tier"] == {"cloud": 2, "edge": 2, "user": 1}
    every = strategy({"total_rounds": 2, "warmup_rounds": 0, "final_rounds": 2, "target_rank": 1,
                      "budget_tiers": ["user", "edge", "cloud"]})
    every.full_rank, every.tier_of = dict(algorithm.full_rank), dict(algorithm.tier_of)
    every.round_scores = {"c": torch.tensor([9.0, 0.0])}
    every.after_round(1, {})
    assert every.active["c"] == [0]


def test_the_session_steps_e_with_its_own_learning_rate() -> None:
    state = {**_factors(2, 0.5), "head.w": torch.zeros(2)}
    plugin = session({"e_lr_scale": 16.0}, state=state)
    assert plugin.lr_scales() == {"svd_e": 16.0}
    from shared.model.adapters import tensor_kind_of
    from shared.runtime.session import OptimizerSettings

    params = plugin.build_adapters(state)
    optimizer = OptimizerSettings().make(params, 1e-3, plugin.lr_scales(), tensor_kind_of)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(params["m.lora_E"])] == pytest.approx(16e-3)
    assert lrs[id(params["m.lora_A"])] == lrs[id(params["m.lora_B"])] == lrs[id(params["head.w"])] == 1e-3


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
    algorithm = strategy()
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
    edge = strategy(tier=Tier.EDGE)  # a fresh instance, as the edge makes one per round
    download = _factors(3, -1.0)
    download["m" + INDEX] = torch.tensor([1, 4, 6])
    out = edge.aggregate("edge", [_update("u1", [1, 4], 2.0, 2), _update("u2", [4], 5.0, 6)], download)
    assert out["m" + INDEX].tolist() == [1, 4] and out["m.lora_A"].shape == (2, 2)  # triplet 6: nobody trained it
    assert out["m.lora_A"][:, 0].tolist() == [2.0, (2 * 2 + 5 * 6) / 8] and out["m" + SAMPLES].tolist() == [2.0, 8.0]
    cloud = strategy()
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
    algorithm = strategy()
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
