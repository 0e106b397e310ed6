"""DropPEFT (arXiv 2503.10217): stochastic transformer layer dropout, per-device ratios from a bandit, PTLS.

STLD
    At each training step blocks are skipped, the residual stream passing through unchanged. Block
    ``l`` (global index, ``L`` blocks in the model) has the skip probability ``p_l = min(p * 2l /
    (L - 1), max_layer_ratio)``: 0 for the first block, growing linearly with depth, averaging ``p``
    (the device's ratio) where the cap does not bite; personal blocks (PTLS) are never skipped
    (``p_l = 0``: they are what each user keeps of its own). With ``skip`` "fixed" (the default)
    each tier skips a fixed number of its own blocks at every step (the sum of their ``p_l``,
    rounded at random between its floor and ceiling), drawn by weight ``p_l``, so that the device's
    peak activation memory falls, not just its mean; with "independent" each block is one draw
    (the paper's). The mask of a step is drawn from ``derive_seed(plan.seed, plan.round_id,
    plan.user_id, step, "stld")`` over ALL ``L`` blocks (every tier knows the split), so the user,
    edge and cloud tiers each derive the same mask for the blocks they hold without any extra
    message. A skipped block is not run (``Partition.run_blocks`` runs the listed blocks only): no
    forward, no backward, no saved activations. Evaluation runs every block.

Online ratios
    The coordinator's (persistent) instance keeps one UCB1 policy per user over ``ratios``
    (default 0, 0.1, ..., 0.5), deterministic under ``seed`` (the order in which a user first tries
    the arms, and ties, come from a seeded permutation). ``configure_round`` puts each user's arm in
    ``plan.extra["ratio"]``; ``after_round`` rewards it with the training progress per second:
    the user's progress (mean of the first ``window`` share of its step losses - mean of the last
    share), divided by the mean |progress| of the round's other participants (the loss falls less
    per round as training converges, for every arm alike; dividing by the round's scale keeps an
    arm tried late from looking worse than one tried early; leaving the user itself out keeps its
    own arm from damping its reward), over the round's time: the slowest participant's step seconds
    (``reward`` "round", the default: devices train in parallel, so a fast device gains nothing by
    dropping blocks while a straggler sets the round's time), or the user's own ("own", the
    paper's). Step seconds are what the device reports: the simulator's virtual clock
    (``shared.protocol.clock``), or the wall clock. The UCB index scales its bonus by the range of
    the user's arm means (UCB1 assumes rewards in [0, 1]). ``ratio`` set in the config fixes the
    ratio for everyone (no bandit).

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
import statistics
from collections.abc import Collection, Iterable
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


def layer_ratios(ratio: float, num_layers: int, cap: float, personal: Collection[int] = ()) -> list[float]:
    """Per-block skip probabilities ``min(ratio * 2l / (L - 1), cap)``, averaging ``ratio`` below the cap; 0 for personal blocks."""
    if num_layers <= 1:
        return [0.0] * num_layers
    return [0.0 if l in personal else min(max(ratio * 2.0 * l / (num_layers - 1), 0.0), cap) for l in range(num_layers)]


def tier_ranges(split: tuple[int, int] | None, num_layers: int) -> list[tuple[int, int]]:
    """The blocks of each tier, ``[0, a)``, ``[a, b)``, ``[b, L)`` (empty ones left out); the whole model without a split."""
    cuts = [0, *(split or ()), num_layers]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def skip_mask(seed: int, round_id: int, user_id: str, step: int, probs: list[float],
              ranges: list[tuple[int, int]] | None = None) -> list[bool]:
    """Which blocks step ``step`` skips (True), from per-block probabilities; the same on every tier.

    With ``ranges`` (the tiers' blocks): each tier skips a fixed number of its blocks, the sum ``s``
    of their probabilities rounded at random (``floor(s)``, plus one with probability ``s -
    floor(s)``, so the mean is the paper's), drawn without replacement with weights ``probs``
    (Efraimidis and Spirakis: the largest ``u ** (1 / p)``). No step of a tier skips fewer than
    ``floor(s)`` blocks, so its peak activation memory falls with the mean. Without ``ranges``: one
    independent draw per block (the paper's), whose mean falls but whose peak is a step that
    happens to skip nothing.
    """
    rng = random.Random(derive_seed(seed, round_id, user_id, step, "stld"))
    if ranges is None:
        return [rng.random() < p for p in probs]  # one draw per block, always
    mask = [False] * len(probs)
    for lo, hi in ranges:
        keys = {l: rng.random() ** (1.0 / probs[l]) for l in range(lo, hi) if probs[l] > 0}
        expected = round(sum(probs[lo:hi]), 9)  # 0.2 + 0.4 + ... is 2.0000000000000004
        k = math.floor(expected) + (1 if rng.random() < expected - math.floor(expected) else 0)
        for l in sorted(keys, key=lambda l: (-keys[l], l))[:min(k, len(keys))]:
            mask[l] = True
    return mask


@dataclass
class DropPEFTConfig(AlgorithmConfig):
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # the bandit's arms
    ratio: float | None = None  # a fixed ratio for every user instead of the bandit
    max_layer_ratio: float = 0.9  # cap of a block's skip probability (the deepest block would reach 2p)
    exploration: float = 0.5  # UCB's c: index = mean + c * spread of arm means * sqrt(2 ln n / n_arm)
    window: float = 0.25  # share of a round's steps averaged at its start and at its end for the reward
    normalize: str = "round"  # "round": divide a user's progress by the round's other users' mean |progress|; "none"
    reward: str = "round"  # progress per second of the round (its slowest user's time), or "own": of the user's own
    skip: str = "fixed"  # "fixed": each tier skips a fixed number of its blocks a step; "independent": a draw per block
    personal_layers: list[int] = field(default_factory=list)  # global block indices kept per user (PTLS), never skipped
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
        for name, value, allowed in (("normalize", self.normalize, ("round", "none")),
                                     ("reward", self.reward, ("round", "own")),
                                     ("skip", self.skip, ("fixed", "independent"))):
            if value not in allowed:
                raise InvalidInput(f"droppeft: {name} must be one of {list(allowed)} (got '{value}')")
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


def progress(losses: list[float], window: float) -> float | None:
    """Mean of the first ``window`` share of a round's step losses minus the mean of its last share."""
    n = len(losses)
    if n < 2:
        return None
    k = max(1, min(n // 2, int(round(window * n))))
    value = sum(losses[:k]) / k - sum(losses[n - k:]) / k
    return value if math.isfinite(value) else None


def is_personal(config: DropPEFTConfig, key: str) -> bool:
    block = block_of(key)
    return block is not None and block in config.personal_layers


def ratio_of(config: DropPEFTConfig, plan: RoundPlan) -> float:
    """The plan's ratio: the bandit's arm, else the config's fixed ratio, else 0."""
    if "ratio" in plan.extra:
        return float(plan.extra["ratio"])
    return float(config.ratio) if config.ratio is not None else 0.0


OUTLIER_FACTOR = 10.0  # with 3 or more users, a device's seconds count at most this many times their median


def reported(values: Any) -> list[float]:
    """A device's self-reported per-step figures; empty (no reward) unless a list of finite non-negative numbers."""
    ok = isinstance(values, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                          and math.isfinite(x) and x >= 0 for x in values)
    return [float(x) for x in values] if ok else []


def slowest(seconds: Iterable[float]) -> float:
    """The round's time, its slowest device's; with 3 or more devices, one reporting over ``OUTLIER_FACTOR`` times
    the median counts as that much, so one device's claim cannot scale every other device's reward."""
    values = list(seconds)
    if len(values) >= 3:
        cap = OUTLIER_FACTOR * statistics.median(values)
        values = [min(v, cap) for v in values]
    return max(values, default=0.0)


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
        """Each user's arm rewarded with its (normalised) progress per second of the round, or of its own time."""
        arms = self.assigned.pop(round_id, None)
        if not arms:
            return
        flagged = metrics.get("flagged", {})  # users whose self-reported loss the cloud did not believe
        users = {u: m for u, m in metrics.get("users", {}).items() if u in arms and u not in flagged}
        seconds = {u: sum(reported(m.get("step_seconds"))) for u, m in users.items()}
        made = {u: progress(reported(m.get("losses")), self.config.window) for u, m in users.items()}
        made = {u: v for u, v in made.items() if v is not None and seconds[u] > 0}
        round_seconds = slowest(seconds[u] for u in made)  # the devices train in parallel: the slowest sets it
        for user_id, value in sorted(made.items()):
            time_ = round_seconds if self.config.reward == "round" else seconds[user_id]
            reward = value / self._round_scale(user_id, made) / time_
            self._policy(user_id).update(arms[user_id], reward)
            self.history.append({"round": round_id, "user": user_id, "ratio": self.config.ratios[arms[user_id]],
                                 "progress": value, "seconds": seconds[user_id], "round_seconds": round_seconds,
                                 "reward": reward})

    def _round_scale(self, user_id: str, made: dict[str, float]) -> float:
        """The round's progress scale for ``user_id``: the mean |progress| of the round's OTHER users.

        The loss falls less per round as training converges, for every arm alike; dividing by the
        round's scale keeps an arm tried late from looking worse than one tried early. Leaving the
        user out keeps its own arm from damping its reward; with no other user (or ``normalize``
        "none") the progress stays as it is.
        """
        others = [abs(v) for u, v in made.items() if u != user_id]
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
        return skip_mask(self.plan.seed, self.plan.round_id, self.plan.user_id, step, self.probs(), self.ranges())

    def probs(self) -> list[float]:
        """Each block's skip probability at this plan's ratio (0 for personal blocks)."""
        return layer_ratios(ratio_of(self.config, self.plan), self.ctx.num_layers, self.config.max_layer_ratio,
                            self.config.personal_layers)

    def ranges(self) -> list[tuple[int, int]] | None:
        """The tiers' block ranges the fixed-count mask is drawn over (None: independent draws)."""
        if self.config.skip != "fixed":
            return None
        return tier_ranges(tuple(self.ctx.spec.split) if self.ctx.spec else None, self.ctx.num_layers)

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
