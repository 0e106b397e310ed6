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

from shared.config.flags import model_flag_values
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl import (AlgorithmConfig, SessionContext, SessionPlugin, Strategy, StrategyContext,
                       algorithm_names, get_algorithm, register_algorithm)
from shared.fl.aggregation import AdapterUpdate
from shared.fl.fedavg import FEDAVG, FedAvgConfig
from shared.lab.cli import build_parser
from shared.lab.sim import SimConfig
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from shared.protocol.messages import RoundPlan
from plans import make_plan

STRATEGY_HOOKS = ("configure_round", "before_round", "pack_download", "validate_update", "aggregate", "after_round")
SESSION_HOOKS = ("build_adapters", "lr_scales", "base_overrides", "layers_to_run", "extra_loss", "after_backward",
                 "pack_update")
HOOKS = STRATEGY_HOOKS + SESSION_HOOKS
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


CALLS: list[Call] = []  # every hook call of the recorder, in order (users run in threads: appends are atomic)


class RecorderStrategy(Strategy):
    """Overrides every coordinator hook, keeps the base behaviour, and records each call."""

    def _record(self, hook: str, tier: str | None = None, detail: Any = None) -> None:
        CALLS.append(Call(hook, _where(), tier, None, self.config.tag, detail))

    def configure_round(self, round_id, participants):
        self._record("configure_round", detail=(round_id, tuple(p.user_id for p in participants)))
        return {p.user_id: {"marker": f"for-{p.user_id}"} for p in participants}

    def before_round(self, round_id, global_state):
        self._record("before_round", detail=(round_id, tuple(sorted(global_state))))
        return super().before_round(round_id, global_state)

    def pack_download(self, tier, state, round_id):
        self._record("pack_download", tier, detail=round_id)
        return super().pack_download(tier, state, round_id)

    def validate_update(self, tier, state, previous, source):
        self._record("validate_update", tier, detail=source)
        return super().validate_update(tier, state, previous, source)

    def aggregate(self, tier, updates, previous):
        self._record("aggregate", tier, detail=tuple(sorted(u.source for u in updates)))
        return super().aggregate(tier, updates, previous)

    def after_round(self, round_id, metrics):
        self._record("after_round", detail=(round_id, tuple(sorted(metrics))))


class RecorderSession(SessionPlugin):
    """Overrides every session hook, keeps the base behaviour, and records each call with its tier and mode."""

    def _record(self, hook: str, detail: Any = None) -> None:
        CALLS.append(Call(hook, _where(), self.ctx.tier, self.plan.mode, self.config.tag, detail))

    def build_adapters(self, state):
        self._record("build_adapters", detail=(self.plan.user_id, self.plan.extra.get("marker")))
        return super().build_adapters(state)

    def lr_scales(self):
        self._record("lr_scales", detail=self.plan.user_id)
        return super().lr_scales()

    def base_overrides(self, blocks):
        self._record("base_overrides", detail=tuple(sorted(blocks)))
        return super().base_overrides(blocks)

    def layers_to_run(self, step):
        self._record("layers_to_run", detail=tuple(self.ctx.layer_ids))
        return super().layers_to_run(step)

    def extra_loss(self, params):
        self._record("extra_loss")
        return 0.0 * sum(p.square().sum() for p in params.values())  # a real (zero) term through autograd

    def after_backward(self, params):
        self._record("after_backward", detail=all(p.grad is not None for p in params.values()))

    def pack_update(self, params):
        self._record("pack_update", detail=self.plan.user_id)
        return super().pack_update(params)


RECORDER = register_algorithm("test-recorder", config=RecorderConfig, strategy=RecorderStrategy,
                              session=RecorderSession)


class EvenBlocksOnly(SessionPlugin):
    """Trains through the even-numbered blocks only (evaluation, where the hook is called too, runs them all)."""

    def layers_to_run(self, step):
        if not self.plan.training:
            return list(self.ctx.layer_ids)
        return [i for i in self.ctx.layer_ids if i % 2 == 0]


register_algorithm("test-even-blocks", session=EvenBlocksOnly)


# --- every hook, where it belongs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(hermetic_cache) -> list[Call]:
    from shared.lab.sim import Simulation

    CALLS.clear()
    cfg = SimConfig(model="tiny-llama", users=4, edges=2, rounds=1, split=(1, 3), max_len=16,
                    max_examples_per_client=4, eval_examples_per_client=2, baseline_eval=False,
                    round=RoundConfig(local_steps=2, batch_size=2, algorithm="test-recorder", config={"tag": "t1"}))
    sim = Simulation(cfg)
    sim.run_round()
    calls = list(CALLS)
    CALLS.clear()
    return calls


USERS = {f"user-{i}" for i in range(4)}
EDGE_USERS = {"edge-0": ("user-0", "user-2"), "edge-1": ("user-1", "user-3")}  # users are dealt round-robin


def test_every_hook_is_called(recorded: list[Call]) -> None:
    assert {c.hook for c in recorded} == set(HOOKS)
    assert {c.tag for c in recorded} == {"t1"}  # the plug-in's config reached every tier


@pytest.mark.parametrize("hook", SESSION_HOOKS)
def test_tier_hooks_run_on_every_tier_in_that_tiers_service(recorded: list[Call], hook: str) -> None:
    calls = [c for c in recorded if c.hook == hook]
    assert {c.tier for c in calls} == {"user", "edge", "cloud"}
    for c in calls:
        assert c.where == SERVICE_OF_TIER[c.tier], c


def test_training_hooks_run_once_per_step_and_user(recorded: list[Call]) -> None:
    steps, eval_batches = 2, 1
    for hook in ("layers_to_run", "extra_loss", "after_backward"):
        counts = Counter(c.tier for c in recorded if c.hook == hook and c.mode == "train")
        assert counts == {t: steps * len(USERS) for t in ("user", "edge", "cloud")}, hook
    for hook in ("extra_loss", "after_backward"):  # evaluation has no backward
        assert {c.mode for c in recorded if c.hook == hook} == {"train"}, hook
    # layers_to_run is asked in evaluation too: once per user and evaluation batch on every tier
    assert Counter(c.tier for c in recorded if c.hook == "layers_to_run" and c.mode == "eval") == \
        {t: eval_batches * len(USERS) for t in ("user", "edge", "cloud")}
    assert all(c.detail for c in recorded if c.hook == "after_backward")  # gradients are there when it runs
    expected_layers = {"user": (0,), "edge": (1, 2), "cloud": (3,)}
    assert all(c.detail == expected_layers[c.tier] for c in recorded if c.hook == "layers_to_run")


def test_build_adapters_opens_a_replica_per_user_tier_and_phase_with_the_round_extras(recorded: list[Call]) -> None:
    calls = [c for c in recorded if c.hook == "build_adapters"]
    assert Counter((c.tier, c.mode) for c in calls) == {(t, m): len(USERS) for t in SERVICE_OF_TIER for m in ("train", "eval")}
    for c in calls:
        user, marker = c.detail
        assert marker == (f"for-{user}" if c.mode == "train" else None), c


def test_session_setup_hooks_run_once_per_session(recorded: list[Call]) -> None:
    # the optimizer's scales are asked for training sessions only; base overrides for every session
    lr = [c for c in recorded if c.hook == "lr_scales"]
    assert Counter((c.tier, c.mode) for c in lr) == {(t, "train"): len(USERS) for t in SERVICE_OF_TIER}
    base = [c for c in recorded if c.hook == "base_overrides"]
    assert Counter((c.tier, c.mode) for c in base) == {(t, m): len(USERS) for t in SERVICE_OF_TIER
                                                      for m in ("train", "eval")}
    expected_blocks = {"user": (0,), "edge": (1, 2), "cloud": (3,)}  # the tier's loaded blocks, by global index
    assert all(c.detail == expected_blocks[c.tier] for c in base)


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


def test_validate_update_checks_users_at_their_edge_and_edges_at_the_cloud(recorded: list[Call]) -> None:
    calls = Counter((c.where, c.tier, c.detail) for c in recorded if c.hook == "validate_update")
    at_edges = {("edge_server", "user", f"user {u}"): 1 for u in USERS}  # training updates only
    at_cloud = {("cloud_server", t, f"edge {e} ({t} tier)"): 1 for e in EDGE_USERS for t in ("user", "edge")}
    assert calls == at_edges | at_cloud


def test_round_hooks_run_once_at_the_cloud(recorded: list[Call]) -> None:
    [before] = [c for c in recorded if c.hook == "before_round"]
    [configure] = [c for c in recorded if c.hook == "configure_round"]
    [after] = [c for c in recorded if c.hook == "after_round"]
    assert before.where == configure.where == after.where == "cloud_server"
    assert before.detail == (1, ("cloud", "edge", "user"))  # it sees every tier's global adapters
    round_id, participants = configure.detail
    assert round_id == 1 and sorted(participants) == sorted(USERS)
    round_id, metric_names = after.detail
    assert round_id == 1 and {"train_loss", "eval_loss"} <= set(metric_names)
    assert recorded.index(before) == 0 and recorded.index(configure) == 1
    assert recorded.index(after) == len(recorded) - 1
    # the downloads of both phases (train, eval) are packed at the cloud, for the user and edge tiers
    downloads = Counter((c.where, c.tier) for c in recorded if c.hook == "pack_download")
    assert downloads == {("cloud_server", "user"): 2, ("cloud_server", "edge"): 2}


# --- the registry and configs ----------------------------------------------------------------------


def test_fedavg_is_registered_and_the_default() -> None:
    assert "fedavg" in algorithm_names()
    assert {"test-recorder", "test-even-blocks"} <= set(algorithm_names())
    algorithm = get_algorithm("fedavg")
    assert algorithm == FEDAVG and algorithm.config_cls is FedAvgConfig
    strategy = algorithm.strategy(None, StrategyContext(Tier.CLOUD))
    assert type(strategy) is Strategy and isinstance(strategy.config, FedAvgConfig)
    session = algorithm.session(None, SessionContext(Tier.EDGE, make_plan(), [1], 2, None, {}))
    assert type(session) is SessionPlugin and isinstance(session.config, FedAvgConfig)
    # FedAvg is the base behaviour, every hook left as it is
    assert algorithm.strategy_cls is Strategy and algorithm.session_cls is SessionPlugin
    assert make_plan().algorithm == "fedavg"
    assert RoundConfig().algorithm == "fedavg"
    assert SimConfig().round.algorithm == "fedavg"
    args = build_parser().parse_args(["sim"])
    assert RoundConfig(**model_flag_values(args, RoundConfig)).algorithm == "fedavg"


def test_registry_refuses_a_second_class_under_a_taken_name() -> None:
    for taken in ("fedavg", "test-recorder"):
        impostor = type("Impostor", (Strategy,), {})
        with pytest.raises(ValueError, match=f"'{taken}' is already registered"):
            register_algorithm(taken, strategy=impostor)
        with pytest.raises(ValueError, match=f"'{taken}' is already registered"):
            register_algorithm(taken, config=RecorderConfig, session=type("Impostor", (SessionPlugin,), {}))
    assert get_algorithm("fedavg") == FEDAVG and get_algorithm("test-recorder") == RECORDER
    assert register_algorithm("fedavg", config=FedAvgConfig) == FEDAVG  # the same parts again are harmless
    assert get_algorithm("fedavg").strategy_cls is Strategy


def test_registry_refuses_a_nameless_plugin() -> None:
    with pytest.raises(ValueError, match="non-empty name"):
        register_algorithm("", strategy=RecorderStrategy)


def test_unknown_algorithm_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'nope'") as err:
        get_algorithm("nope")
    assert isinstance(err.value, InvalidInput)  # a client's mistake (422)
    for name in algorithm_names():
        assert name in str(err.value)


@pytest.mark.parametrize("cls, data", [(AlgorithmConfig, {"lr": 1}), (FedAvgConfig, {"mu": 0.1}),
                                       (RecorderConfig, {"tag": "x", "other": 2})])
def test_config_refuses_unknown_fields(cls: type[AlgorithmConfig], data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        cls.from_dict(data)


def test_config_round_trip_and_validation_through_the_registry() -> None:
    assert RecorderConfig.from_dict({"tag": "x"}).to_dict() == {"tag": "x"}
    assert RecorderConfig.from_dict(None) == RecorderConfig()
    assert get_algorithm("test-recorder").strategy({"tag": "y"}, StrategyContext(Tier.CLOUD)).config == RecorderConfig(tag="y")
    ctx = SessionContext(Tier.USER, make_plan(), [0], 1, None, {})
    assert get_algorithm("test-recorder").session({"tag": "z"}, ctx).config == RecorderConfig(tag="z")
    with pytest.raises(ValueError, match="unknown fields"):
        get_algorithm("fedavg").strategy({"mu": 0.1}, StrategyContext(Tier.CLOUD))
    with pytest.raises(ValueError, match="unknown fields"):
        get_algorithm("fedavg").session({"mu": 0.1}, ctx)


def test_round_plan_round_trips_and_refuses_unknown_fields() -> None:
    plan = make_plan(round_id=2, algorithm="test-recorder", config={"tag": "a"}, extra={"r": 0.5}, mode="eval")
    assert RoundPlan.from_meta(plan.to_meta()) == plan
    with pytest.raises(ValueError, match="round plan message has unknown field"):
        RoundPlan.from_meta({**plan.to_meta(), "code": "import os"})


def test_coordinator_refuses_an_unknown_algorithm_before_the_round(small_sim) -> None:
    sim = small_sim()
    with pytest.raises(ValueError, match="unknown algorithm"):
        sim.coordinator.new_round(RoundConfig(algorithm="nope"))
    with pytest.raises(ValueError, match="unknown fields"):
        sim.coordinator.new_round(RoundConfig(algorithm="fedavg", config={"mu": 1}))
    assert sim.coordinator.new_round(RoundConfig()).round_id == 1  # nothing was accepted before


def test_base_hooks_default_behaviour() -> None:
    plan = make_plan()
    state = {"k": torch.ones(2)}
    session = SessionPlugin(AlgorithmConfig(), SessionContext(Tier.EDGE, plan, [1, 2], 4, None, {"k": (2,)}))
    params = session.build_adapters(state)
    assert isinstance(params["k"], nn.Parameter) and params["k"].data_ptr() != state["k"].data_ptr()
    assert session.layers_to_run(0) == [1, 2]
    assert session.extra_loss(params) is None
    assert session.lr_scales() == {} and session.base_overrides({1: nn.Linear(2, 2)}) == {}
    packed = session.pack_update(params)
    assert torch.equal(packed["k"], state["k"]) and not packed["k"].requires_grad
    with pytest.raises(InvalidInput, match="lack"):  # the tier's slots must all be there
        SessionPlugin(AlgorithmConfig(), SessionContext(Tier.EDGE, plan, [1], 4, None, {"k": (2,), "j": (1,)})
                      ).build_adapters(state)
    strategy = Strategy(AlgorithmConfig(), StrategyContext(Tier.CLOUD))
    merged = strategy.aggregate(Tier.EDGE, [AdapterUpdate("a", "edge", {"k": torch.zeros(2)}, 1),
                                            AdapterUpdate("b", "edge", {"k": torch.ones(2) * 4}, 3)], state)
    assert torch.equal(merged["k"], torch.full((2,), 3.0))
    bundle = AdapterBundle({Tier.USER: state})
    assert strategy.before_round(1, bundle) is bundle and strategy.pack_download(Tier.USER, state, 1) is state
    assert strategy.configure_round(1, []) == {}
    strategy.validate_update(Tier.USER, {"k": torch.zeros(2)}, state, "u")
    with pytest.raises(InvalidInput, match="update from u"):
        strategy.validate_update(Tier.USER, {"k": torch.zeros(3)}, state, "u")


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
