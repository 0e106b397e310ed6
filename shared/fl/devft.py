"""DevFT (arXiv 2508.00041): developmental stages of fused submodels that grow to the full depth.

Schedule
    ``layers`` lists each stage's representative layers (growing, ending at the model's depth),
    ``rounds`` the committed rounds of each stage (one number for all); the last stage goes on after
    its rounds. The coordinator's (persistent) strategy counts the DevFT rounds it has committed and
    puts the round's stage in ``plan.extra`` (``{"stage": 2, "layers": 8}``). A schedule that does not
    end at the full depth, has more layers than the model, grows backwards or has a first stage that
    leaves a tier holding blocks without a representative is refused when the round is submitted (422).

A stage's submodel, on every tier (``shared.model.fusion``)
    The tier's share of the stage's layers follows from its share of the model's blocks; its blocks
    are cut into that many contiguous groups by parameter similarity, and each group is fused into
    its first block (the anchor) by differential fusion with ``beta``. The tier runs only the anchors,
    with the fused weights (``base_overrides``, ``layers_to_run``), in training and evaluation. Groups
    are computed from the tier's own blocks and cached in its plug-in store; nothing of another tier
    is read.

Adapters and knowledge transfer
    A stage's adapters are those of its anchors (``blocks.<anchor>.*``), so the global version has the
    stage's shape and a round moves only the representatives' adapters. Where the global adapters
    come down in another stage's shape (the first round of a stage, or version 0 at full depth),
    ``build_adapters`` first spreads each representative's adapters to every block of its group
    (``transfer``), then the tier trains its new anchors from there; ``pack_update`` sends back the
    anchors' adapters only. The groups of the adapters that came down are read off their keys (a
    group runs from its anchor to the next one), so no tier needs another's groups. The version
    committed after the first round of a stage has that stage's shape.

Checks
    An update in the round's own shape is checked as usual. In the first round of a stage an update
    has the next stage's anchors: it must then be shaped like the previous global adapters reshaped
    to those anchors (``reshape``), anchors within its tier's blocks; such updates are combined by
    the sample-weighted mean, unclipped, like other compact updates (``shared.fl.robust``).

Restarts
    The stage is counted in the cloud's memory. A restarted cloud resumes from the stage whose shape
    the global adapters have, or from the first stage where they have the full depth.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl.aggregation import check_update
from shared.fl.plugin import (AlgorithmConfig, Participant, SessionContext, SessionPlugin, Strategy, StrategyContext,
                              register_algorithm)
from shared.model.adapters import AdapterState
from shared.model.fusion import fused_overrides, groups_of, representative_shares, split_block_key, tier_groups
from shared.model.partition import Split
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import TIERS, Tier

Json = dict[str, Any]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class DevFTConfig(AlgorithmConfig):
    layers: list[int] = field(default_factory=list)  # representative layers of each stage, growing to the full depth
    rounds: int | list[int] = 1  # committed rounds of each stage (one number: every stage); the last goes on
    beta: float = 0.1  # differential fusion: anchor + min(beta, 1 / group size) * sum of the others' differences

    def __post_init__(self) -> None:
        if not isinstance(self.layers, list) or not self.layers or not all(_count(n) for n in self.layers):
            raise InvalidInput(f"devft: 'layers' must list each stage's number of layers, e.g. [4, 8, 16, 30] "
                               f"(got {self.layers!r})")
        for i in range(1, len(self.layers)):
            if self.layers[i] <= self.layers[i - 1]:
                raise InvalidInput(f"devft: stages must grow: stage {i + 1} has {self.layers[i]} layers, not more "
                                   f"than stage {i}'s {self.layers[i - 1]}")
        rounds = [self.rounds] * len(self.layers) if _count(self.rounds) else self.rounds
        if not isinstance(rounds, list) or len(rounds) != len(self.layers) or not all(_count(r) for r in rounds):
            raise InvalidInput(f"devft: 'rounds' must be a number of rounds >= 1 or one per stage "
                               f"({len(self.layers)}; got {self.rounds!r})")
        self.rounds = list(rounds)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise InvalidInput(f"devft: beta must be a number in [0, 1] (got {self.beta!r})")
        self.beta = float(self.beta)

    @property
    def stage_rounds(self) -> list[int]:
        return list(self.rounds)  # type: ignore[arg-type]  # a list once validated

    def check_model(self, split: Split) -> None:
        """Refuse a schedule this deployment's model and split cannot run (``InvalidInput``: 422)."""
        depth = split.num_layers
        for i, n in enumerate(self.layers):
            if n > depth:
                raise InvalidInput(f"devft: stage {i + 1} has {n} layers, more than the model's {depth}")
        if self.layers[-1] != depth:
            raise InvalidInput(f"devft: the schedule must end at the model's full depth, {depth} layers "
                               f"(its last stage has {self.layers[-1]})")
        holders = sum(1 for t in TIERS if len(split.layers(t.value)))
        if self.layers[0] < holders:
            raise InvalidInput(f"devft: stage 1 has {self.layers[0]} layers, but {holders} tiers hold blocks "
                               f"(split {split.a},{split.b}) and each needs at least one representative")


# -- adapters between stages ------------------------------------------------------------------------------


def transfer(state: AdapterState, layer_ids: list[int]) -> AdapterState:
    """Knowledge transfer: every block of ``layer_ids`` takes the adapters of its group's representative.

    The groups are those of the adapters in ``state``: each starts at a block whose adapters it holds
    (its anchor) and runs to the next one. Keys of other tiers' blocks and of the head pass through.
    """
    mine = set(layer_ids)
    by_block: dict[int, dict[str, Any]] = {}
    out: AdapterState = {}
    for key, value in state.items():
        parsed = split_block_key(key)
        if parsed is None or parsed[0] not in mine:
            out[key] = value
        else:
            by_block.setdefault(parsed[0], {})[parsed[1]] = value
    try:
        groups = groups_of(sorted(by_block), layer_ids)
    except ValueError as exc:
        raise InvalidInput(f"devft: adapters that came down cannot be regrouped: {exc}") from None
    for group in groups:
        for block in group:
            for rest, value in by_block[group[0]].items():
                out[f"blocks.{block}.{rest}"] = value if block == group[0] else value.clone()
    return out


def select(state: AdapterState, layer_ids: list[int], anchors: set[int]) -> AdapterState:
    """The adapters of ``anchors`` among this tier's blocks, with every key that is not a block's of this tier."""
    mine = set(layer_ids)
    return {k: v for k, v in state.items()
            if (parsed := split_block_key(k)) is None or parsed[0] not in mine or parsed[0] in anchors}


def reshape(state: AdapterState, layer_ids: list[int], anchors: set[int]) -> AdapterState:
    """A tier's adapters in the shape of the stage whose representatives are ``anchors`` (transfer, then select)."""
    return select(transfer(state, layer_ids), layer_ids, anchors)


def block_ids(state: AdapterState) -> list[int]:
    """The blocks whose adapters ``state`` holds."""
    return sorted({parsed[0] for k in state if (parsed := split_block_key(k)) is not None})


# -- the coordinator ------------------------------------------------------------------------------------------


class DevFTStrategy(Strategy):
    """The stage schedule (rounds counted at the cloud), the checks of reshaped updates, the stage's metrics."""

    config: DevFTConfig

    def __init__(self, config: DevFTConfig, ctx: StrategyContext) -> None:
        super().__init__(config, ctx)
        self.completed = 0  # DevFT rounds committed with this config
        self.planned: dict[int, int] = {}  # round -> the stage (index) it was planned in
        self.ends = [sum(config.stage_rounds[:i + 1]) for i in range(len(config.layers))]

    @classmethod
    def check_request(cls, config: AlgorithmConfig, request: RoundConfig, spec: ModelSpec, num_layers: int) -> None:
        if isinstance(config, DevFTConfig):
            config.check_model(Split(spec.split[0], spec.split[1], num_layers))

    def _split(self) -> Split | None:
        if self.ctx.spec is None or not self.ctx.num_layers:
            return None
        return Split(self.ctx.spec.split[0], self.ctx.spec.split[1], self.ctx.num_layers)

    def stage(self) -> int:
        """The index of the stage the next round trains in."""
        return min(bisect.bisect_right(self.ends, self.completed), len(self.ends) - 1)

    def before_round(self, round_id: int, global_state: AdapterBundle) -> AdapterBundle:
        """A restarted cloud resumes at least from the stage whose shape the global adapters have."""
        split = self._split()
        if split is not None:
            held = {t.value: len(block_ids(global_state[t])) for t in TIERS}
            for i, layers in enumerate(self.config.layers[:-1]):
                if representative_shares(split, layers) == held:
                    self.completed = max(self.completed, self.ends[i - 1] if i else 0)
        return global_state

    def configure_round(self, round_id: int, participants: list[Participant]) -> dict[str, Json]:
        split = self._split()
        own_cut = sorted(p.user_id for p in participants if split is not None and p.cut not in (None, split.a))
        if own_cut:  # the stages' shares and groups follow the deployment's split, which these users don't run
            raise InvalidInput(f"devft: users {own_cut[:5]} hold their own cut, and DevFT's stages follow the "
                               f"deployment's split {split.a},{split.b}: leave them out of the round (participants)")
        for stale in [r for r in self.planned if r < round_id]:  # rounds that failed never committed
            del self.planned[stale]
        index = self.planned[round_id] = self.stage()
        return {p.user_id: {"stage": index + 1, "layers": self.config.layers[index]} for p in participants}

    def validate_update(self, tier: Tier, state: AdapterState, previous: AdapterState, source: str) -> None:
        """As usual in the round's own shape; in a stage's first round, against the previous adapters reshaped."""
        split = self._split()
        if set(state) == set(previous) or split is None:
            check_update(state, previous, source)
            return
        layer_ids = list(split.layers(Tier(tier).value))
        anchors = set(block_ids(state))
        if not anchors <= set(layer_ids):
            raise InvalidInput(f"update from {source}: adapters of blocks {sorted(anchors - set(layer_ids))} "
                               f"that its tier does not hold")
        if layer_ids and layer_ids[0] not in anchors:
            raise InvalidInput(f"update from {source}: the first group of its tier (block {layer_ids[0]}) has "
                               f"no representative")
        check_update(state, reshape(previous, layer_ids, anchors), source)

    def round_metrics(self, round_id: int, state: AdapterBundle) -> Json:
        index = self.planned.get(round_id, self.stage())
        return {"stage": index + 1, "stages": len(self.config.layers), "layers": self.config.layers[index],
                "representatives": {t.value: block_ids(state[t]) for t in TIERS if t in state}}

    def after_round(self, round_id: int, metrics: Json) -> None:
        if self.planned.pop(round_id, None) is not None:
            self.completed += 1


# -- a session on one tier --------------------------------------------------------------------------------------


class DevFTSession(SessionPlugin):
    """The stage's representatives on this tier: adapters transferred, fused weights, the anchors run."""

    config: DevFTConfig

    def __init__(self, config: DevFTConfig, ctx: SessionContext) -> None:
        super().__init__(config, ctx)
        self.came_down: list[int] = []  # the anchors of the adapters that came down, on this tier
        self.groups: list[list[int]] = []

    def _share(self) -> int | None:
        """This tier's representatives in the plan's stage; None without a stage (evaluation keeps the shape)."""
        layers = self.plan.extra.get("layers")
        if layers is None or self.ctx.spec is None:
            return None
        split = Split(self.ctx.spec.split[0], self.ctx.spec.split[1], self.ctx.num_layers)
        try:
            return representative_shares(split, int(layers))[Tier(self.ctx.tier).value]
        except ValueError as exc:
            raise InvalidInput(f"devft: {exc}") from None

    def build_adapters(self, state: AdapterState) -> dict[str, nn.Parameter]:
        self.came_down = [b for b in block_ids(state) if b in set(self.ctx.layer_ids)]
        return super().build_adapters(transfer(state, self.ctx.layer_ids))

    def base_overrides(self, blocks: Any) -> dict[str, Any]:
        share = self._share()
        store = self.ctx.store
        with store.setdefault("lock", threading.Lock()):
            if share is None or share == len(self.came_down):
                self.groups = groups_of(self.came_down, self.ctx.layer_ids)
            else:
                cached, key = store.setdefault("groups", {}), (share, tuple(self.ctx.layer_ids))
                if key not in cached:
                    cached[key] = tier_groups(blocks, share)
                self.groups = cached[key]
            key = (tuple(tuple(g) for g in self.groups), self.config.beta)
            if store.get("fused_key") != key:  # one stage's fused weights at a time
                store["fused"], store["fused_key"] = fused_overrides(blocks, self.groups, self.config.beta), key
            return dict(store["fused"])

    def layers_to_run(self, step: int) -> list[int]:
        return [group[0] for group in self.groups]

    def pack_update(self, params: dict[str, nn.Parameter]) -> AdapterState:
        return select(super().pack_update(params), self.ctx.layer_ids, {group[0] for group in self.groups})


DEVFT = register_algorithm("devft", config=DevFTConfig, strategy=DevFTStrategy, session=DevFTSession)
