"""DropPEFT (arXiv 2503.10217): stochastic transformer layer dropout, per-device ratios from a bandit, PTLS.

STLD
    At each training step every block ``l`` (global index, ``L`` blocks in the model) is skipped, the
    residual stream passing through unchanged, with probability ``p_l = min(p * 2l / (L - 1),
    max_layer_ratio)``: 0 for the first block, growing linearly with depth, averaging ``p`` (the
    device's ratio) where the cap does not bite. The mask of a step is drawn from
    ``derive_seed(plan.seed, plan.round_id, plan.user_id, step, "stld")`` over ALL ``L`` blocks, so
    the user, edge and cloud tiers each derive the same mask for the blocks they hold without any
    extra message. A skipped block is not run (``Partition.run_blocks`` runs the listed blocks only):
    no forward, no backward, no saved activations. Evaluation runs every block (the runtime calls
    ``layers_to_run`` in training only).

Online ratios
    The coordinator's (persistent) instance keeps one UCB1 policy per user over ``ratios``
    (default 0, 0.1, ..., 0.5), deterministic under ``seed`` (the order in which a user first tries
    the arms, and ties, come from a seeded permutation). ``configure_round`` puts each user's arm in
    ``plan.extra["ratio"]``; ``after_round`` rewards it with the training progress per second of that
    user's round: (mean of the first ``window`` share of its step losses - mean of the last share)
    / sum of its step seconds (which include its device slowdown). Rewards are normalised twice:
    per round, by the mean absolute reward of the round's other participants (the loss falls less
    per round as training converges, for every arm alike; dividing by the round's scale keeps an arm
    tried late from looking worse than one tried early; leaving the user itself out keeps its own
    arm from damping its reward), and in the UCB index by the range of the user's arm means (UCB1
    assumes rewards in [0, 1]). ``ratio`` set in the config
    fixes the ratio for everyone (no bandit).

PTLS
    ``personal_layers`` (global block indices) name blocks whose adapters stay with each user and
    are never averaged. Every tier keeps the personal values of the blocks it holds per user in its
    ``ctx.store`` (the user's device for user-tier blocks, the edge and the cloud for theirs).
    ``build_adapters`` (train and eval) replaces the global values of personal keys with the user's
    own once that user has them; ``pack_update`` stores the trained personal values and sends, for
    personal keys, the value that came down with the round start, so that updates keep the global
    keys and shapes (``validate_update``'s default check holds) and carry nothing personal;
    ``aggregate`` (edge pre-aggregation and cloud) then sets personal keys to ``previous`` exactly,
    which also undoes any rounding a lossy download or upload codec put on them. The global value of
    a personal key therefore never changes; it is what a user starts from before it has its own.
    A personal value is kept as soon as the tier packs its update, even if that round then fails at
    the cloud (it is the device's own state, not the global version).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.model.adapters import AdapterState, block_of
from shared.fl.aggregation import AdapterUpdate, weighted_mean
from shared.errors import InvalidInput
from shared.fl.plugin import (AlgorithmConfig, Participant, SessionContext, SessionPlugin, Strategy, StrategyContext,
                              register_algorithm)
from shared.protocol.enums import Tier
from shared.protocol.messages import RoundPlan
from shared.seeds import derive_seed

STORE_PERSONAL = "personal"  # ctx.store[STORE_PERSONAL][user_id][key] = that user's own adapter tensor


def layer_ratios(ratio: float, num_layers: int, cap: float) -> list[float]:
    """Per-block skip probabilities ``min(ratio * 2l / (L - 1), cap)``, averaging ``ratio`` below the cap."""
    if num_layers <= 1:
        return [0.0] * num_layers
    return [min(max(ratio * 2.0 * l / (num_layers - 1), 0.0), cap) for l in range(num_layers)]


def skip_mask(seed: int, round_id: int, user_id: str, step: int, ratio: float, num_layers: int,
              cap: float) -> list[bool]:
    """Which of the model's ``num_layers`` blocks step ``step`` skips; the same on every tier."""
    rng = random.Random(derive_seed(seed, round_id, user_id, step, "stld"))
    return [rng.random() < p for p in layer_ratios(ratio, num_layers, cap)]  # one draw per block, always


@dataclass
class DropPEFTConfig(AlgorithmConfig):
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # the bandit's arms
    ratio: float | None = None  # a fixed ratio for every user instead of the bandit
    max_layer_ratio: float = 0.9  # cap of a block's skip probability (the deepest block would reach 2p)
    exploration: float = 0.5  # UCB's c: index = mean + c * spread of arm means * sqrt(2 ln n / n_arm)
    window: float = 0.25  # share of a round's steps averaged at its start and at its end for the reward
    normalize: str = "round"  # "round": divide rewards by the round's other users' mean |reward|; "none"
    personal_layers: list[int] = field(default_factory=list)  # global block indices kept per user (PTLS)
    seed: int = 0

    def __post_init__(self) -> None:
        self.ratios = [float(r) for r in self.ratios]
        if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise InvalidInput(f"droppeft: ratios must be a non-empty list of values in [0, 1) (got {self.ratios})")
        if self.ratio is not None and not 0.0 <= float(self.ratio) < 1.0:
            raise InvalidInput(f"droppeft: ratio must be in [0, 1) (got {self.ratio})")
        if not 0.0 <= self.max_layer_ratio < 1.0:
            raise InvalidInput(f"droppeft: max_layer_ratio must be in [0, 1) (got {self.max_layer_ratio})")
        if self.exploration < 0 or not 0.0 < self.window <= 0.5:
            raise InvalidInput(f"droppeft: exploration must be >= 0 and window in (0, 0.5] "
                             f"(got {self.exploration}, {self.window})")
        if self.normalize not in ("round", "none"):
            raise InvalidInput(f"droppeft: normalize must be 'round' or 'none' (got '{self.normalize}')")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.personal_layers):
            raise InvalidInput(f"droppeft: personal_layers must be global block indices >= 0 (got {self.personal_layers})")
        self.personal_layers = sorted(set(self.personal_layers))


class UCBPolicy:
    """UCB1 over a few arms for one user; deterministic given its seed and the rewards it is fed.

    Untried arms go first, in a seeded order; then the arm maximising
    ``mean + c * spread * sqrt(2 ln n / n_arm)``, where ``spread`` is the range of the arms' mean
    rewards so far (UCB1 assumes rewards in [0, 1]; this makes the index scale-free), ties broken by
    the same seeded order.
    """

    def __init__(self, num_arms: int, exploration: float = 0.5, seed: int = 0) -> None:
        self.exploration = exploration
        self.order = list(range(num_arms))
        random.Random(seed).shuffle(self.order)
        self.counts = [0] * num_arms
        self.sums = [0.0] * num_arms

    def means(self) -> list[float | None]:
        return [s / n if n else None for s, n in zip(self.sums, self.counts)]

    def spread(self) -> float:
        """The range of the tried arms' mean rewards: the scale the bonus is measured in (1 if none yet)."""
        means = [m for m in self.means() if m is not None]
        return max(means) - min(means) if len(means) > 1 and max(means) > min(means) else 1.0

    def index(self, arm: int) -> float:
        n, n_arm = sum(self.counts), self.counts[arm]
        if n_arm == 0:
            return math.inf
        return self.sums[arm] / n_arm + self.exploration * self.spread() * math.sqrt(2.0 * math.log(max(n, 1)) / n_arm)

    def select(self) -> int:
        best, best_index = self.order[0], -math.inf
        for arm in self.order:  # strict '>' keeps the earliest arm of the seeded order on ties
            value = self.index(arm)
            if value > best_index:
                best, best_index = arm, value
        return best

    def update(self, arm: int, reward: float) -> None:
        if not math.isfinite(reward):
            return
        self.counts[arm] += 1
        self.sums[arm] += reward

    def best(self) -> int:
        """The arm with the highest mean reward (the seeded order among untried or tied arms)."""
        means = self.means()
        return max(self.order, key=lambda a: (means[a] if means[a] is not None else -math.inf, -self.order.index(a)))

    def to_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "means": self.means()}


def progress_per_second(losses: list[float], step_seconds: list[float], window: float) -> float | None:
    """(mean of the first ``window`` share of the losses - mean of the last share) / total step seconds."""
    n = min(len(losses), len(step_seconds))
    seconds = float(sum(step_seconds[:n]))
    if n < 2 or not seconds > 0:
        return None
    k = max(1, min(n // 2, int(round(window * n))))
    first, last = sum(losses[:k]) / k, sum(losses[n - k:n]) / k
    value = (first - last) / seconds
    return value if math.isfinite(value) else None


def is_personal(config: DropPEFTConfig, key: str) -> bool:
    block = block_of(key)
    return block is not None and block in config.personal_layers


def ratio_of(config: DropPEFTConfig, plan: RoundPlan) -> float:
    """The plan's ratio: the bandit's arm, else the config's fixed ratio, else 0."""
    if "ratio" in plan.extra:
        return float(plan.extra["ratio"])
    return float(config.ratio) if config.ratio is not None else 0.0


class DropPEFTStrategy(Strategy):
    """The coordinator's bandits (one per user, kept across rounds) and PTLS-aware aggregation."""

    config: DropPEFTConfig

    def __init__(self, config: DropPEFTConfig, ctx: StrategyContext) -> None:
        super().__init__(config, ctx)
        self.policies: dict[str, UCBPolicy] = {}
        self.assigned: dict[int, dict[str, int]] = {}  # round -> user -> arm handed out
        self.history: list[dict[str, Any]] = []

    def _policy(self, user_id: str) -> UCBPolicy:
        if user_id not in self.policies:
            self.policies[user_id] = UCBPolicy(len(self.config.ratios), self.config.exploration,
                                               derive_seed(self.config.seed, user_id, "droppeft-ucb"))
        return self.policies[user_id]

    def configure_round(self, round_id: int, participants: list[Participant]) -> dict[str, dict[str, Any]]:
        for stale in [r for r in self.assigned if r < round_id]:  # rounds that failed never got their reward
            del self.assigned[stale]
        if self.config.ratio is not None:
            return {p.user_id: {"ratio": float(self.config.ratio)} for p in participants}
        arms = {p.user_id: self._policy(p.user_id).select() for p in participants}
        self.assigned[round_id] = arms
        return {u: {"ratio": self.config.ratios[a], "arm": a} for u, a in arms.items()}

    def after_round(self, round_id: int, metrics: dict[str, Any]) -> None:
        arms = self.assigned.pop(round_id, None)
        if not arms:
            return
        raw: dict[str, float] = {}
        for user_id, m in metrics.get("users", {}).items():
            if user_id not in arms:
                continue
            value = progress_per_second(list(m.get("losses", [])), list(m.get("step_seconds", [])), self.config.window)
            if value is not None:
                raw[user_id] = value
        for user_id, value in sorted(raw.items()):
            reward = value / self._round_scale(user_id, raw)
            self._policy(user_id).update(arms[user_id], reward)
            self.history.append({"round": round_id, "user": user_id, "ratio": self.config.ratios[arms[user_id]],
                                 "raw_reward": value, "reward": reward})

    def _round_scale(self, user_id: str, raw: dict[str, float]) -> float:
        """The round's progress scale for ``user_id``: the mean |reward| of the round's OTHER users.

        Leaving the user out keeps its own arm from damping its reward; with no other user (or
        ``normalize`` "none") the reward stays as it is.
        """
        others = [abs(v) for u, v in raw.items() if u != user_id]
        if self.config.normalize != "round" or not others:
            return 1.0
        scale = sum(others) / len(others)
        return scale if scale > 0 else 1.0

    def aggregate(self, tier: Tier, updates: list[AdapterUpdate], previous: AdapterState) -> AdapterState:
        merged = weighted_mean(updates)
        for key in merged:
            if is_personal(self.config, key) and key in previous:
                merged[key] = previous[key].detach().clone().to(merged[key].dtype)
        return merged


class DropPEFTSession(SessionPlugin):
    """A session on one tier: the step's skip mask over this tier's blocks, and the user's personal layers."""

    config: DropPEFTConfig

    def __init__(self, config: DropPEFTConfig, ctx: SessionContext) -> None:
        super().__init__(config, ctx)
        self.download: AdapterState = {}  # what came down for the personal keys (sent back in their place)

    def _personal_store(self) -> dict[str, torch.Tensor]:
        return self.ctx.store.setdefault(STORE_PERSONAL, {}).setdefault(self.plan.user_id, {})

    def mask(self, step: int) -> list[bool]:
        """The step's skip mask over the whole model's blocks (True = skipped)."""
        return skip_mask(self.plan.seed, self.plan.round_id, self.plan.user_id, step, ratio_of(self.config, self.plan),
                         self.ctx.num_layers, self.config.max_layer_ratio)

    def layers_to_run(self, step: int) -> list[int]:
        if not self.plan.training or ratio_of(self.config, self.plan) <= 0.0:  # evaluation runs every block
            return list(self.ctx.layer_ids)
        skipped = self.mask(step)
        return [i for i in self.ctx.layer_ids if not skipped[i]]

    def build_adapters(self, state: AdapterState) -> dict[str, nn.Parameter]:
        params = super().build_adapters(state)
        bad = [i for i in self.config.personal_layers if i >= self.ctx.num_layers]
        if bad:
            raise InvalidInput(f"droppeft: personal_layers {bad} are not blocks of a {self.ctx.num_layers}-block model")
        personal = [k for k in params if is_personal(self.config, k)]
        if not personal:
            return params
        self.download = {k: state[k].detach().clone() for k in personal}
        own = self._personal_store()
        with torch.no_grad():
            for key in personal:
                if key in own and tuple(own[key].shape) == tuple(params[key].shape):
                    params[key].copy_(own[key].to(params[key].device, params[key].dtype))
        return params

    def pack_update(self, params: dict[str, nn.Parameter]) -> AdapterState:
        out = super().pack_update(params)
        personal = [k for k in out if is_personal(self.config, k)]
        if personal and self.plan.training:
            own = self._personal_store()
            for key in personal:
                own[key] = out[key].detach().cpu().clone()
                out[key] = self.download[key].clone()  # what came down: nothing personal leaves the tier
        return out


DROPPEFT = register_algorithm("droppeft", config=DropPEFTConfig, strategy=DropPEFTStrategy, session=DropPEFTSession)
