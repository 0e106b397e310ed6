"""Algorithm plug-ins: every hook runs where it should, the registry, configs, skipping blocks."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cloud_server.rounds import RoundRequest
from shared.fl.aggregation import AdapterUpdate
from shared.fl import Algorithm, AlgorithmConfig, RoundPlan, algorithm_names, create_algorithm, register_algorithm
from shared.fl.fedavg import FedAvg, FedAvgConfig
from shared.lab.cli import build_parser
from shared.lab.sim import SimConfig

HOOKS = ("configure_round", "build_adapters", "layers_to_run", "extra_loss", "after_backward", "pack_update",
         "aggregate", "after_round")
SERVICE_OF_TIER = {"user": "user_agent", "edge": "edge_server", "cloud": "cloud_server"}


@dataclass(frozen=True)
class Call:
    hook: str
    where: str  # the nearest service package on the call stack: user_agent, edge_server or cloud_server
    tier: str | None = None
    mode: str | None = None
    tag: str = ""
    detail: Any = None


def _where() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        package = Path(frame.f_code.co_filename).parent.name
        if package in SERVICE_OF_TIER.values():
            return package
        frame = frame.f_back
    return "?"


@dataclass
class RecorderConfig(AlgorithmConfig):
    tag: str = ""


@register_algorithm
class Recorder(Algorithm):
    """Overrides every hook, keeps the base behaviour, and records each call (class-level: one instance per tier)."""

    name = "test-recorder"
    config_cls = RecorderConfig
    calls: list[Call] = []

    def _record(self, hook: str, tier: str | None = None, plan: RoundPlan | None = None, detail: Any = None) -> None:
        Recorder.calls.append(Call(hook, _where(), tier, plan.mode if plan else None, self.config.tag, detail))

    def configure_round(self, round_id, participants):
        self._record("configure_round", detail=(round_id, tuple(p.user_id for p in participants)))
        return {p.user_id: {"marker": f"for-{p.user_id}"} for p in participants}

    def build_adapters(self, tier, state, plan):
        self._record("build_adapters", tier, plan, detail=(plan.user_id, plan.extra.get("marker")))
        return super().build_adapters(tier, state, plan)

    def layers_to_run(self, tier, layer_ids, plan, step):
        self._record("layers_to_run", tier, plan, detail=tuple(layer_ids))
        return super().layers_to_run(tier, layer_ids, plan, step)

    def extra_loss(self, tier, params, plan):
        self._record("extra_loss", tier, plan)
        return 0.0 * sum(p.square().sum() for p in params.values())  # a real (zero) term through autograd

    def after_backward(self, tier, params, plan):
        has_grads = all(p.grad is not None for p in params.values())
        self._record("after_backward", tier, plan, detail=has_grads)

    def pack_update(self, tier, params, plan):
        self._record("pack_update", tier, plan, detail=plan.user_id)
        return super().pack_update(tier, params, plan)

    def aggregate(self, tier, updates, previous):
        self._record("aggregate", tier, detail=tuple(sorted(u.source for u in updates)))
        return super().aggregate(tier, updates, previous)

    def after_round(self, round_id, metrics):
        self._record("after_round", detail=(round_id, tuple(sorted(metrics))))


@register_algorithm
class EvenBlocksOnly(Algorithm):
    """Trains through the even-numbered blocks only."""

    name = "test-even-blocks"

    def layers_to_run(self, tier, layer_ids, plan, step):
        return [i for i in layer_ids if i % 2 == 0]


# --- every hook, where it belongs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(hermetic_cache) -> list[Call]:
    from shared.lab.sim import Simulation

    Recorder.calls.clear()
    cfg = SimConfig(model="tiny-llama", users=4, edges=2, rounds=1, split=(1, 3), local_steps=2, batch_size=2, max_len=16,
                    max_examples_per_client=4, eval_examples_per_client=2, algorithm="test-recorder",
                    algorithm_config={"tag": "t1"}, baseline_eval=False)
    sim = Simulation(cfg)
    sim.run_round()
    calls = list(Recorder.calls)
    Recorder.calls.clear()
    return calls


USERS = {f"user-{i}" for i in range(4)}
EDGE_USERS = {"edge-0": ("user-0", "user-2"), "edge-1": ("user-1", "user-3")}  # users are dealt round-robin


def test_every_hook_is_called(recorded: list[Call]) -> None:
    assert {c.hook for c in recorded} == set(HOOKS)
    assert {c.tag for c in recorded} == {"t1"}  # the plug-in's config reached every tier


@pytest.mark.parametrize("hook", ["build_adapters", "layers_to_run", "extra_loss", "after_backward", "pack_update"])
def test_tier_hooks_run_on_every_tier_in_that_tiers_service(recorded: list[Call], hook: str) -> None:
    calls = [c for c in recorded if c.hook == hook]
    assert {c.tier for c in calls} == {"user", "edge", "cloud"}
    for c in calls:
        assert c.where == SERVICE_OF_TIER[c.tier], c


def test_training_hooks_run_once_per_step_and_user(recorded: list[Call]) -> None:
    steps = 2
    for hook in ("layers_to_run", "extra_loss", "after_backward"):
        counts = Counter(c.tier for c in recorded if c.hook == hook)
        assert counts == {t: steps * len(USERS) for t in ("user", "edge", "cloud")}, hook
        assert {c.mode for c in recorded if c.hook == hook} == {"train"}  # evaluation runs every block, no backward
    assert all(c.detail for c in recorded if c.hook == "after_backward")  # gradients are there when it runs
    expected_layers = {"user": (0,), "edge": (1, 2), "cloud": (3,)}
    assert all(c.detail == expected_layers[c.tier] for c in recorded if c.hook == "layers_to_run")


def test_build_adapters_opens_a_replica_per_user_tier_and_phase_with_the_round_extras(recorded: list[Call]) -> None:
    calls = [c for c in recorded if c.hook == "build_adapters"]
    assert Counter((c.tier, c.mode) for c in calls) == {(t, m): len(USERS) for t in SERVICE_OF_TIER for m in ("train", "eval")}
    for c in calls:
        user, marker = c.detail
        assert marker == (f"for-{user}" if c.mode == "train" else None), c


def test_pack_update_once_per_user_on_each_tier(recorded: list[Call]) -> None:
    calls = [c for c in recorded if c.hook == "pack_update"]
    for tier in SERVICE_OF_TIER:
        assert sorted(c.detail for c in calls if c.tier == tier) == sorted(USERS), tier


def test_aggregate_runs_at_edge_pre_aggregation_and_at_the_cloud(recorded: list[Call]) -> None:
    calls = {(c.where, c.tier, c.detail) for c in recorded if c.hook == "aggregate"}
    at_edges = {("edge_server", tier, users) for users in EDGE_USERS.values() for tier in ("user", "edge")}
    at_cloud = {("cloud_server", "user", tuple(EDGE_USERS)), ("cloud_server", "edge", tuple(EDGE_USERS)),
                ("cloud_server", "cloud", tuple(sorted(USERS)))}
    assert calls == at_edges | at_cloud
    assert len([c for c in recorded if c.hook == "aggregate"]) == len(at_edges | at_cloud)


def test_round_hooks_run_once_at_the_cloud(recorded: list[Call]) -> None:
    [configure] = [c for c in recorded if c.hook == "configure_round"]
    [after] = [c for c in recorded if c.hook == "after_round"]
    assert configure.where == after.where == "cloud_server"
    round_id, participants = configure.detail
    assert round_id == 1 and sorted(participants) == sorted(USERS)
    round_id, metric_names = after.detail
    assert round_id == 1 and {"train_loss", "eval_loss"} <= set(metric_names)
    assert recorded.index(configure) == 0 and recorded.index(after) == len(recorded) - 1


# --- the registry and configs ----------------------------------------------------------------------


def test_fedavg_is_registered_and_the_default() -> None:
    assert "fedavg" in algorithm_names()
    assert {"test-recorder", "test-even-blocks"} <= set(algorithm_names())
    algorithm = create_algorithm("fedavg")
    assert type(algorithm) is FedAvg and isinstance(algorithm.config, FedAvgConfig)
    for hook in HOOKS:  # FedAvg is the base behaviour, every hook left as it is
        assert getattr(FedAvg, hook) is getattr(Algorithm, hook), hook
    assert RoundPlan(round_id=1, user_id="u").algorithm == "fedavg"
    assert RoundRequest().algorithm == "fedavg"
    assert SimConfig().algorithm == "fedavg"
    assert build_parser().parse_args(["sim"]).algorithm == "fedavg"


def test_registry_refuses_a_second_class_under_a_taken_name() -> None:
    for taken in ("fedavg", "test-recorder"):
        impostor = type("Impostor", (Algorithm,), {"name": taken})
        with pytest.raises(ValueError, match=f"'{taken}' is already registered"):
            register_algorithm(impostor)
    assert type(create_algorithm("fedavg")) is FedAvg
    assert register_algorithm(FedAvg) is FedAvg  # the same class again is harmless


def test_registry_refuses_a_nameless_plugin() -> None:
    with pytest.raises(ValueError, match="non-empty name"):
        register_algorithm(type("Nameless", (Algorithm,), {}))


def test_unknown_algorithm_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'nope'") as err:
        create_algorithm("nope")
    for name in algorithm_names():
        assert name in str(err.value)


@pytest.mark.parametrize("cls, data", [(AlgorithmConfig, {"lr": 1}), (FedAvgConfig, {"mu": 0.1}),
                                       (RecorderConfig, {"tag": "x", "other": 2})])
def test_config_refuses_unknown_fields(cls: type[AlgorithmConfig], data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        cls.from_dict(data)


def test_config_round_trip_and_validation_through_create_algorithm() -> None:
    assert RecorderConfig.from_dict({"tag": "x"}).to_dict() == {"tag": "x"}
    assert RecorderConfig.from_dict(None) == RecorderConfig()
    assert create_algorithm("test-recorder", {"tag": "y"}).config == RecorderConfig(tag="y")
    with pytest.raises(ValueError, match="unknown fields"):
        create_algorithm("fedavg", {"mu": 0.1})


def test_round_plan_round_trips_and_refuses_unknown_fields() -> None:
    plan = RoundPlan(round_id=2, user_id="u", algorithm="test-recorder", config={"tag": "a"}, extra={"r": 0.5}, mode="eval")
    assert RoundPlan.from_meta(plan.to_meta()) == plan
    with pytest.raises(ValueError, match="unknown round plan fields"):
        RoundPlan.from_meta({**plan.to_meta(), "code": "import os"})


def test_coordinator_refuses_an_unknown_algorithm_before_the_round(small_sim) -> None:
    sim = small_sim()
    with pytest.raises(ValueError, match="unknown algorithm"):
        sim.coordinator.new_round(RoundRequest(algorithm="nope"))
    with pytest.raises(ValueError, match="unknown fields"):
        sim.coordinator.new_round(RoundRequest(algorithm="fedavg", config={"mu": 1}))
    assert sim.coordinator.new_round(RoundRequest()).round_id == 1  # nothing was accepted before


def test_base_hooks_default_behaviour() -> None:
    algorithm = Algorithm()
    plan = RoundPlan(round_id=1, user_id="u")
    state = {"k": torch.ones(2)}
    params = algorithm.build_adapters("edge", state, plan)
    assert isinstance(params["k"], nn.Parameter) and params["k"].data_ptr() != state["k"].data_ptr()
    assert algorithm.layers_to_run("edge", [1, 2], plan, 0) == [1, 2]
    assert algorithm.extra_loss("edge", params, plan) is None
    packed = algorithm.pack_update("edge", params, plan)
    assert torch.equal(packed["k"], state["k"]) and not packed["k"].requires_grad
    merged = algorithm.aggregate("edge", [AdapterUpdate("a", "edge", {"k": torch.zeros(2)}, 1),
                                         AdapterUpdate("b", "edge", {"k": torch.ones(2) * 4}, 3)], state)
    assert torch.equal(merged["k"], torch.full((2,), 3.0))


# --- layers_to_run really skips blocks -------------------------------------------------------------


def test_layers_to_run_subset_skips_blocks_in_training_but_eval_runs_all(small_sim) -> None:
    sim = small_sim(algorithm="test-even-blocks", users=2, local_steps=2, split=(1, 3))
    calls: Counter[tuple[int, str]] = Counter()
    for runtime in sim.runtimes.values():
        for index, block in runtime.partition.blocks.items():
            block.register_forward_hook(
                lambda m, a, o, i=int(index): calls.update([(i, "train" if torch.is_grad_enabled() else "eval")]))
    before = {k: v.clone() for k, v in sim.coordinator.global_state["edge"].items()}
    sim.run_round()
    users, steps, eval_batches = 2, 2, 1
    assert calls == {(0, "train"): users * steps, (2, "train"): users * steps,
                     **{(i, "eval"): users * eval_batches for i in range(4)}}
    after = sim.coordinator.global_state["edge"]
    for key, value in before.items():  # block 1 never ran: its adapters did not move; block 2's did
        if key.startswith("blocks.1.") or ".lora_A." in key:
            continue
        assert not torch.equal(after[key], value), key
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("blocks.1."))
