"""The algorithm plug-in interface: a config, what runs where rounds are coordinated, what runs in a session.

A plug-in is registered under a name with three parts, each overriding only the hooks it needs:

| part                 | hook              | runs at                                                        |
|----------------------|-------------------|----------------------------------------------------------------|
| ``AlgorithmConfig``  | ``__post_init__`` | wherever the config is parsed (the round API first)            |
| ``Strategy``         | check_request     | cloud, when a round is submitted: refuse what cannot run       |
|                      | configure_round   | cloud: per-participant plan extras                             |
|                      | before_round      | cloud: sees every tier's global adapters, may reshape them     |
|                      | pack_download     | cloud: what a round's start carries of the global adapters     |
|                      | validate_update   | edge and cloud: refuse an arriving update (422)                |
|                      | aggregate         | edge (pre-aggregation of its users) and cloud                  |
|                      | aggregate_round   | cloud: a whole round at once, across tiers and deployments     |
|                      | round_metrics     | cloud, before the commit: the algorithm's figures of the round |
|                      | after_round       | cloud, after the commit: bandits, schedules, stage changes     |
| ``SessionPlugin``    | build_adapters    | every tier: the session's trainable replica                    |
|                      | accepts           | every tier: downloaded keys beyond the adapter slots it takes  |
|                      | lr_scales         | every tier: the optimizer's step size per adapter tensor kind  |
|                      | base_overrides    | every tier: frozen base weights this session runs instead      |
|                      | layers_to_run     | every tier, training and evaluation: the blocks of a step      |
|                      | bound             | every tier: the tensors a forward binds (computed ones too)    |
|                      | extra_loss        | every tier: a loss term on its own adapters                    |
|                      | after_backward    | every tier: gradients ready, before the optimizer step         |
|                      | pack_update       | every tier: what leaves it for aggregation                     |

The cloud keeps one ``Strategy`` per (algorithm, config) across rounds; an edge makes one per round
for its pre-aggregation. Every tier makes one ``SessionPlugin`` per session, from the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl.aggregation import AdapterUpdate, check_update, weighted_mean
from shared.model.adapters import (
    AdapterState,
    clone_state,
    pad_rank,
    tensor_kind_of,
    truncate_rank,
)
from shared.model.sources import ModelSource
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from shared.protocol.messages import RoundPlan

Json = dict[str, Any]


@dataclass(frozen=True)
class Participant:
    """A registered user as the coordinator sees it: its weight and the placement the cloud assigned it (None: the
    deployment's default task, cut and rank)."""

    user_id: str
    edge_id: str
    num_samples: int = 0
    data: str | None = None
    cut: int | None = None
    rank: int | None = None
    deployment: str = ""  # the model deployment it trains, in a federation of several


@dataclass
class AlgorithmConfig:
    """Base of every plug-in's config: validated in ``__post_init__``, serialisable with ``to_dict``."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AlgorithmConfig:
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InvalidInput(f"{cls.__name__}: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidInput(f"{cls.__name__}: {exc}") from None

    def to_dict(self) -> Json:
        return dataclasses.asdict(self)


# -- the coordinator's side --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One model deployment as a strategy sees it: its spec, its depth, the prefix of its keys in the global state."""

    spec: ModelSpec
    num_layers: int
    prefix: str = ""
    source: ModelSource | None = None  # its base model's files (H2Tune's similarity alignment probes them)


@dataclass
class StrategyContext:
    """Where a strategy runs: the cloud (the coordinator's instance) or an edge (one round's pre-aggregation).

    ``models`` (the cloud's) describes every deployment of the federation, by name.
    """

    tier: Tier
    spec: ModelSpec | None = None
    seed: int = 0
    models: dict[str, ModelInfo] = field(default_factory=dict)
    num_layers: int = 0  # blocks in the whole model (0: not known)


class Strategy:
    """Plans, downloads, arrivals and aggregation; FedAvg's behaviour by default."""

    def __init__(self, config: AlgorithmConfig, ctx: StrategyContext) -> None:
        self.config, self.ctx = config, ctx

    @classmethod
    def check_request(cls, config: AlgorithmConfig, request: RoundConfig, spec: ModelSpec, num_layers: int) -> None:
        """Refuse, when a round is submitted, one this algorithm cannot run on this deployment and its model of
        ``num_layers`` blocks (``InvalidInput``)."""

    def configure_round(self, round_id: int, participants: list[Participant]) -> dict[str, Json]:
        """Per-participant plan extras (``RoundPlan.extra``), keyed by user id."""
        return {p.user_id: {} for p in participants}

    owned_suffixes: ClassVar[tuple[str, ...]] = ()  # global-state keys only this plug-in reads (H2Tune's ".h2_m")

    def before_round(self, round_id: int, global_state: AdapterBundle) -> AdapterBundle:
        """Every tier's global adapters before the round is planned; return them reshaped (a stage change) or as they
        are. The default leaves out keys another plug-in owns (``owned_suffixes``): a round of this algorithm after
        rounds of that one neither sends nor keeps them."""
        foreign = tuple(OWNED_SUFFIXES - set(self.owned_suffixes))
        if not foreign or not any(k.endswith(foreign) for state in global_state.values() for k in state):
            return global_state
        return AdapterBundle({t: {k: v for k, v in state.items() if not k.endswith(foreign)}
                              for t, state in global_state.items()})

    def pack_download(self, tier: Tier, state: AdapterState, round_id: int) -> AdapterState:
        """What a round's start carries of the global adapters of ``tier`` (user or edge)."""
        return state

    def validate_update(self, tier: Tier, state: AdapterState, previous: AdapterState, source: str) -> None:
        """Refuse an arriving update that cannot join the aggregate (``InvalidInput``: HTTP 422).

        ``previous`` is what was sent down for this round (the download at an edge, the global state
        at the cloud). The default wants the same keys and shapes and finite values.
        """
        check_update(state, previous, source)

    def aggregate(self, tier: Tier, updates: list[AdapterUpdate], previous: AdapterState) -> AdapterState:
        """Combine updates (an edge's users, or the cloud's edges and its own replicas) into one state."""
        return weighted_mean(updates)

    def aggregate_round(self, updates: Mapping[Tier, list[AdapterUpdate]], previous: AdapterBundle) -> AdapterBundle | None:
        """The cloud's aggregate of a whole round at once, every tier and deployment together (H2Tune aligns layers
        across them); None (the default) combines each tier's updates with ``aggregate``, namespace by namespace."""
        return None

    def round_metrics(self, round_id: int, state: AdapterBundle) -> Json:
        """The algorithm's own figures of a round, given every tier's new global adapters: they go into the
        round's metrics under the algorithm's name (none by default)."""
        return {}

    def after_round(self, round_id: int, metrics: Json) -> None:
        """The committed round's metrics, at the cloud (bandit rewards, schedules, stages)."""


# -- a session's side ----------------------------------------------------------------------------------------------


@dataclass
class SessionContext:
    """What a session plug-in may know of the tier it runs on; ``store`` persists across rounds on that tier."""

    tier: Tier
    plan: RoundPlan
    layer_ids: list[int]  # the blocks this session runs on this tier (a participant's own cut decides the user's and edge's)
    num_layers: int  # blocks in the whole model
    spec: ModelSpec | None
    shapes: dict[str, tuple[int, ...]]  # the adapter slots of those blocks (and of the head), at the deployment's rank
    store: dict[str, Any] = field(default_factory=dict)
    tensor_kind: Callable[[str], str] = tensor_kind_of  # adapter key -> its kind ("lora_A", "svd_e", "head", ...)


class SessionPlugin:
    """One (round, user) session on one tier; plain training of every block by default."""

    def __init__(self, config: AlgorithmConfig, ctx: SessionContext) -> None:
        self.config, self.ctx = config, ctx

    @property
    def plan(self) -> RoundPlan:
        return self.ctx.plan

    def build_adapters(self, state: AdapterState) -> dict[str, nn.Parameter]:
        """The session's trainable replica, made from the round's global adapters of this tier (a lower-rank
        participant's truncated to its first ``plan.rank`` components)."""
        missing = set(self.ctx.shapes) - set(state)
        if missing:
            raise InvalidInput(f"{self.ctx.tier} adapters lack {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        if self.plan.rank is not None:
            state = truncate_rank(state, self.plan.rank)
        return {k: nn.Parameter(v) for k, v in clone_state(state).items()}

    def accepts(self, key: str) -> bool:
        """A downloaded key that is no adapter slot's but which ``build_adapters`` takes (H2Tune's middle matrices)."""
        return False

    def lr_scales(self) -> dict[str, float]:
        """Multipliers of the plan's learning rate per adapter tensor kind (``ctx.tensor_kind``); 1 for the rest."""
        return {}

    def base_overrides(self, blocks: Mapping[int, nn.Module]) -> dict[str, torch.Tensor]:
        """Frozen base weights this session runs in place of the tier's own: ``{parameter name: tensor}``.

        Names are the partition's (``blocks.3.self_attn.q_proj.base_layer.weight``); ``blocks`` are
        the tier's loaded blocks by global index, read from a copy of them the tier holds for this call
        alone (no other session's overrides are bound meanwhile; every copy shares the frozen tensors).
        Called after ``build_adapters``. The tier binds the tensors for this session's forward passes
        only (DevFT's fused layers); nothing by default.
        """
        return {}

    def layers_to_run(self, step: int) -> list[int]:
        """The blocks of this tier that step ``step`` runs, in training and in evaluation (all by default)."""
        return list(self.ctx.layer_ids)

    def bound(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """The tensors a forward pass binds into the adapter slots: the parameters themselves by default, or
        tensors computed from them (H2Tune binds M A where peft's layer holds A)."""
        return params

    def extra_loss(self, params: dict[str, nn.Parameter]) -> torch.Tensor | None:
        """A loss term on this tier's adapters only, added to its backward (e.g. a penalty)."""
        return None

    def after_backward(self, params: dict[str, nn.Parameter]) -> None:
        """After the tier's gradients are ready and before its optimizer steps."""

    def pack_update(self, params: dict[str, nn.Parameter]) -> AdapterState:
        """What leaves this tier for aggregation (a lower-rank participant's zero-padded to the deployment's rank)."""
        out = {k: p.detach().clone() for k, p in params.items()}
        return pad_rank(out, self.ctx.shapes) if self.plan.rank is not None else out


# -- the registry ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Algorithm:
    """A registered plug-in: its name, config type, coordinator-side and session-side classes."""

    name: str
    config_cls: type[AlgorithmConfig] = AlgorithmConfig
    strategy_cls: type[Strategy] = Strategy
    session_cls: type[SessionPlugin] = SessionPlugin

    def parse_config(self, data: Mapping[str, Any] | AlgorithmConfig | None) -> AlgorithmConfig:
        return data if isinstance(data, self.config_cls) else self.config_cls.from_dict(data)  # type: ignore[arg-type]

    def strategy(self, config: Mapping[str, Any] | AlgorithmConfig | None, ctx: StrategyContext) -> Strategy:
        return self.strategy_cls(self.parse_config(config), ctx)

    def session(self, config: Mapping[str, Any] | AlgorithmConfig | None, ctx: SessionContext) -> SessionPlugin:
        return self.session_cls(self.parse_config(config), ctx)


_REGISTRY: dict[str, Algorithm] = {}
OWNED_SUFFIXES: set[str] = set()  # every registered strategy's owned_suffixes


def register_algorithm(name: str, *, config: type[AlgorithmConfig] = AlgorithmConfig,
                       strategy: type[Strategy] = Strategy, session: type[SessionPlugin] = SessionPlugin) -> Algorithm:
    """Make a plug-in available by ``name`` (a second registration of the same name with other parts is refused)."""
    entry = Algorithm(name, config, strategy, session)
    if not name:
        raise ValueError("an algorithm needs a non-empty name")
    if name in _REGISTRY and _REGISTRY[name] != entry:
        raise ValueError(f"algorithm '{name}' is already registered")
    _REGISTRY[name] = entry
    OWNED_SUFFIXES.update(strategy.owned_suffixes)
    return entry


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> Algorithm:
    """The registered plug-in ``name``; an unknown name is a client's mistake (``InvalidInput``)."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise InvalidInput(f"unknown algorithm '{name}'; registered: {', '.join(algorithm_names())}")
    return entry

