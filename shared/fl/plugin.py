"""The algorithm plug-in interface: a config dataclass and hooks that default to no-ops."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from shared.model.adapters import AdapterState, clone_state
from shared.fl.aggregation import AdapterUpdate, check_update, weighted_mean


def default_lr(task: str) -> float:
    """AdamW step size when none is given: a fresh classification head wants a larger one than LoRA alone.

    Language modelling uses 2e-4: on smollm2-135m / Shakespeare, 1e-3 overfits each character's few
    speeches within one round (held-out loss rose in round 2), 2e-4 lowers it round over round.
    """
    return 5e-3 if task == "cls" else 2e-4


@dataclass
class RoundPlan:
    """What one participant does in one round; travels as msgpack metadata, never as code."""

    round_id: int
    user_id: str
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    algorithm: str = "fedavg"
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # per-participant plug-in data (ratios, masks, ...)
    mode: str = "train"  # "train" or "eval"

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "RoundPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(meta) - names
        if unknown:
            raise ValueError(f"unknown round plan fields: {sorted(unknown)}")
        return cls(**meta)


@dataclass
class Participant:
    user_id: str
    edge_id: str
    num_samples: int = 0


@dataclass
class AlgorithmConfig:
    """Base of every plug-in's config: validated in ``__post_init__``, serialisable with ``asdict``."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "AlgorithmConfig":
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Algorithm:
    """A federated algorithm over the split runtime. Override only the hooks you need.

    | hook             | runs at                          |
    |------------------|----------------------------------|
    | configure_round  | cloud                            |
    | pack_download    | cloud (what a round start sends) |
    | build_adapters   | every tier                       |
    | layers_to_run    | every tier                       |
    | extra_loss       | every tier                       |
    | after_backward   | every tier                       |
    | pack_update      | every tier (what leaves it)      |
    | validate_update  | edge, cloud (what arrives)       |
    | aggregate        | edge (pre), cloud                |
    | after_round      | cloud                            |

    On every tier but the cloud's coordinator, a fresh instance is made per session from the
    plan; ``self.ctx`` (a ``shared.tier.TierContext``) then says which tier and blocks it runs on
    and holds ``store``, a dict that persists across rounds on that tier (personal layers, scores).
    The coordinator's instance persists across rounds (bandit state, schedules, masks).
    """

    ctx: Any = None

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig

    def __init__(self, config: AlgorithmConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    def configure_round(self, round_id: int, participants: list[Participant]) -> dict[str, dict[str, Any]]:
        """Per-participant plan extras (``RoundPlan.extra``), keyed by user id."""
        return {p.user_id: {} for p in participants}

    def pack_download(self, tier: str, state: AdapterState, round_id: int) -> AdapterState:
        """What a round's start carries of the global adapters of ``tier`` (user or edge)."""
        return state

    def build_adapters(self, tier: str, state: AdapterState, plan: RoundPlan) -> dict[str, nn.Parameter]:
        """A session's trainable replica, made from the round's global adapters of this tier."""
        if self.ctx is not None:
            missing = set(self.ctx.shapes) - set(state)
            if missing:
                raise ValueError(f"{tier} adapters lack {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        return {k: nn.Parameter(v) for k, v in clone_state(state).items()}

    def layers_to_run(self, tier: str, layer_ids: list[int], plan: RoundPlan, step: int) -> list[int]:
        """The blocks of this tier to run at this training step (all of them by default)."""
        return layer_ids

    def extra_loss(self, tier: str, params: dict[str, nn.Parameter], plan: RoundPlan) -> torch.Tensor | None:
        """A loss term on this tier's adapters only, added to its backward (e.g. a penalty)."""
        return None

    def after_backward(self, tier: str, params: dict[str, nn.Parameter], plan: RoundPlan) -> None:
        """After the tier's gradients are ready and before its optimizer steps."""

    def pack_update(self, tier: str, params: dict[str, nn.Parameter], plan: RoundPlan) -> AdapterState:
        """What leaves this tier for aggregation."""
        return {k: p.detach().clone() for k, p in params.items()}

    def validate_update(self, tier: str, state: AdapterState, previous: AdapterState, source: str) -> None:
        """Refuse an arriving update that cannot join the aggregate (ValueError: HTTP 422).

        ``previous`` is what was sent down for this round (the download at an edge, the global
        state at the cloud). The default wants the same keys and shapes and finite values.
        """
        check_update(state, previous, source)

    def aggregate(self, tier: str, updates: list[AdapterUpdate], previous: AdapterState) -> AdapterState:
        """Combine updates (an edge's users, or the cloud's edges) into one state."""
        return weighted_mean(updates)

    def after_round(self, round_id: int, metrics: dict[str, Any]) -> None:
        """Round metrics, at the cloud after commit (bandit rewards, schedules, stages)."""


_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make a plug-in available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm '{cls.name}' is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def create_algorithm(name: str, config: dict[str, Any] | None = None) -> Algorithm:
    """Instantiate a registered plug-in with a validated config; unknown names raise ValueError."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown algorithm '{name}'; registered: {', '.join(algorithm_names())}")
    return cls(cls.config_cls.from_dict(config))
