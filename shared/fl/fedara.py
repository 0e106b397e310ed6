"""FedARA (arXiv 2501.14406): truncated-SVD adapters, adaptive rank allocation at the cloud, module pruning.

Every adapted weight carries dW = P diag(e) Q (peft's AdaLoRA layers, ``ModelSpec.adapter == "svd"``):
``<module>.lora_B`` = P (d x r), ``<module>.lora_A`` = Q (r x k), ``<module>.lora_E`` = e (r x 1).
A *triplet* i is (P[:, i], e[i], Q[i, :]).

Hooks, tier by tier:

* cloud coordinator (one instance kept across rounds): ``configure_round`` puts the active triplets
  of every module in ``RoundPlan.extra["active"]`` (``{module: [indices]}``, msgpack-native);
  ``pack_download`` sends the active rows/columns only, plus ``<module>.rank_index`` (their indices),
  and nothing of a pruned module; ``validate_update`` / ``aggregate`` accept compact updates and
  scatter them back into the full global tensors, triplet by triplet; ``after_round`` aggregates the
  clients' importance scores and applies the budget schedule to choose the next round's triplets.
* every tier (a fresh instance per session): ``build_adapters`` keeps the active triplets only (a
  module with none is left out, so ``AdapterSlots`` switches its layer off); ``extra_loss`` adds the
  orthogonality penalty; ``after_backward`` updates the importance EMAs; ``pack_update`` sends the
  compact tensors with ``<module>.rank_index`` and ``<module>.rank_score``.
* edge pre-aggregation: the same per-triplet ``aggregate``; its compact result also carries
  ``<module>.rank_samples`` (the samples behind each triplet) so the cloud weights triplets exactly.

Importance (AdaLoRA's): per parameter entry I = |w * dL/dw|, Ibar <- b1 Ibar + (1 - b1) I,
U <- b2 U + (1 - b2) |I - Ibar|, s = Ibar * U; per triplet S_i = s(e_i) + mean_j s(Q_ij) + mean_j s(P_ji).
The coordinator keeps a moving average of each triplet's aggregated score across rounds
(``score_beta``); a masked triplet, which nobody scores, moves its average as far as
its tier's scored triplets' averages moved (``svd.smooth_scores``).

Budget: per tier, over the adapted modules of the tiers in ``budget_tiers`` (by default the user
and edge tiers: the adapters that travel; the cloud's never leave it and keep their initial
triplets). Scores of different tiers are not compared: the cloud's run 100-1000x larger than a
user's, so one global ranking would spend the budget on the tier whose adapters cost no bytes.
For the round about to train, t = 1, 2, ...: b0 while t <= warmup; bT once t > total - final; in
between, with n = total - warmup - final decay rounds and k = t - warmup,
b(t) = bT + (b0 - bT) * (1 - k / (n + 1))**3 (rounded); b0 = init_rank per module of the tier,
bT = target_rank * its modules. The triplets kept are the tier's highest by moving-average score
among ALL its initial triplets, masked ones included: a masked triplet whose average beats an
active one's comes back (with the values it kept in the global state).

Step size: under Adam every tensor entry moves by about the learning rate per step. LoRA's
output moves through every entry of B (d x r), the SVD form's mainly through r scalars e, so at
one learning rate e learns far too slowly. A change of lr in B_i moves dW by about
lr * sqrt(d / 3) (A's rows, uniform in +-1/sqrt(k), have norm 1/sqrt(3)); a change of lr in e_i
moves it by lr * |P_i| |Q_i|, which is 1 for orthonormal factors and 0.02^2 * sqrt(d k) (0.15) at the start. The
session therefore steps e with ``e_lr_scale`` times the round's learning rate (default 16: about
sqrt(384 / 3) = 11 for orthonormal factors of minilm's 384-wide modules, more while P and Q are
still small; ``lr_scales``), and P, Q with the round's.

Masked triplets keep their values in the global state; the model FedARA trains is the global state
restricted to the active triplets (``FedARA.active`` at the coordinator, ``masked_state`` below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl.aggregation import AdapterUpdate, AggregationError
from shared.fl.plugin import (AlgorithmConfig, Participant, SessionContext, SessionPlugin, Strategy, StrategyContext,
                              register_algorithm)
from shared.fl.svd import (E_SUFFIX, FACTORS, INDEX, P_SUFFIX, Q_SUFFIX, SAMPLES, SCORE, ImportanceTracker,
                           budget_schedule, check_indices, check_module_update, compact, float_ok, module_of,
                           orthogonality_penalty, rank_triplets, require_svd, smooth_scores, split_state,
                           triplet_scores)
from shared.model.adapters import AdapterState
from shared.protocol.enums import Tier


BUDGET_TIERS = (Tier.USER.value, Tier.EDGE.value)  # the tiers whose adapters travel


@dataclass
class FedARAConfig(AlgorithmConfig):
    """Options of FedARA; ``init_rank`` 0 means the deployment's rank, ``target_rank`` None a third of it."""

    init_rank: int = 0  # triplets per module at the start (capped by the adapters' rank)
    target_rank: float | None = None  # average active triplets per module of a budgeted tier at the end
    total_rounds: int = 10  # rounds the schedule spans
    warmup_rounds: int = 2  # rounds at the initial budget (scores of a barely trained model are noise)
    final_rounds: int = 2  # last rounds at the target budget
    beta1: float = 0.85  # EMA of the sensitivity (per step, in a session)
    beta2: float = 0.85  # EMA of its uncertainty
    score_beta: float = 0.5  # moving average of each triplet's score across rounds, at the coordinator
    ortho_weight: float = 0.1  # weight of the orthogonality penalty (a sum of squared norms; peft's AdaLoRA: 0.5
    #                            on a mean of unsquared norms)
    e_lr_scale: float = 16.0  # e's learning rate over the round's (see the module doc)
    budget_tiers: list[str] = field(default_factory=lambda: list(BUDGET_TIERS))  # tiers whose triplets are budgeted

    def __post_init__(self) -> None:
        if self.init_rank < 0:
            raise InvalidInput(f"fedara: init_rank must be >= 0 (0: the adapters' rank), got {self.init_rank}")
        if self.target_rank is not None and not self.target_rank > 0:
            raise InvalidInput(f"fedara: target_rank must be > 0 (or null: a third of the initial rank), got {self.target_rank}")
        if self.target_rank is not None and self.init_rank and self.target_rank > self.init_rank:
            raise InvalidInput(f"fedara: target_rank {self.target_rank} exceeds init_rank {self.init_rank}")
        if min(self.total_rounds, self.warmup_rounds, self.final_rounds) < 0 or \
                self.warmup_rounds + self.final_rounds > self.total_rounds:
            raise InvalidInput(f"fedara: need 0 <= warmup_rounds + final_rounds <= total_rounds (got {self.warmup_rounds}"
                             f" + {self.final_rounds} > {self.total_rounds})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.score_beta < 1):
            raise InvalidInput(f"fedara: beta1, beta2 and score_beta must lie in [0, 1) (got {self.beta1}, {self.beta2}, "
                               f"{self.score_beta})")
        if not self.ortho_weight >= 0:
            raise InvalidInput(f"fedara: ortho_weight must be >= 0, got {self.ortho_weight}")
        if not self.e_lr_scale > 0:
            raise InvalidInput(f"fedara: e_lr_scale must be > 0, got {self.e_lr_scale}")
        tiers = [t.value for t in Tier]
        if not isinstance(self.budget_tiers, list) or any(t not in tiers for t in self.budget_tiers):
            raise InvalidInput(f"fedara: budget_tiers must list tiers among {tiers} (got {self.budget_tiers})")


def initial_triplets(config: FedARAConfig, rank: int) -> list[int]:
    """The triplets a module trains before any allocation: ``init_rank`` of them (0: all ``rank``)."""
    return list(range(min(config.init_rank, rank) if config.init_rank else rank))


class FedARAStrategy(Strategy):
    """The coordinator's allocation (kept across rounds) and the per-triplet aggregation (cloud and edge)."""

    config: FedARAConfig

    def __init__(self, config: FedARAConfig, ctx: StrategyContext) -> None:
        super().__init__(config, ctx)
        self.full_rank: dict[str, int] = {}  # module -> r of its slot, learnt from the global states
        self.tier_of: dict[str, str] = {}  # module -> the tier that holds it
        self.active: dict[str, list[int]] | None = None  # None: nothing allocated yet (initial triplets)
        self.scores: dict[str, torch.Tensor] = {}  # module -> moving average of each triplet's aggregated score
        self.round_scores: dict[str, torch.Tensor] = {}  # this round's (NaN: nobody held the triplet)
        self.completed = 0
        self.history: list[dict[str, Any]] = []

    @classmethod
    def check_request(cls, config: AlgorithmConfig, request: RoundConfig, spec: ModelSpec, num_layers: int) -> None:
        require_svd(spec)
        if request.aggregator != "mean":
            raise InvalidInput("fedara combines compact per-triplet updates: use aggregator 'mean'")

    def _learn(self, module: str, rank: int, tier: Tier | str) -> None:
        self.full_rank[module] = rank
        self.tier_of[module] = str(tier)

    def _active_of(self, module: str, rank: int) -> list[int]:
        if self.active is not None and module in self.active:
            return list(self.active[module])
        return initial_triplets(self.config, rank)

    def budgets(self) -> dict[str, tuple[int, int]]:
        """(initial, target) active triplets per budgeted tier, over the modules known so far."""
        per_module = self.config.target_rank
        if per_module is None:
            per_module = (self.config.init_rank or max(self.full_rank.values(), default=0)) / 3.0
        out = {}
        for tier in self.config.budget_tiers:
            modules = [m for m, t in self.tier_of.items() if t == tier]
            if modules:
                initial = sum(len(initial_triplets(self.config, self.full_rank[m])) for m in modules)
                out[tier] = (initial, min(initial, max(0, int(round(per_module * len(modules))))))
        return out

    def configure_round(self, round_id: int, participants: list[Participant]) -> dict[str, dict[str, Any]]:
        self.round_scores = {}
        extra: dict[str, Any] = {"round": self.completed + 1}
        if self.active is not None:
            extra["active"] = {m: list(v) for m, v in sorted(self.active.items())}
        return {p.user_id: {k: (dict(v) if isinstance(v, dict) else v) for k, v in extra.items()} for p in participants}

    def pack_download(self, tier: Tier, state: AdapterState, round_id: int) -> AdapterState:
        modules, out = split_state(state)
        out = dict(out)
        for module, factors in sorted(modules.items()):
            rank = int(factors[Q_SUFFIX].shape[0])
            self._learn(module, rank, tier)
            idx = self._active_of(module, rank)
            if not idx:  # a pruned module: nothing of it travels
                continue
            for suffix, value in compact(factors, idx).items():
                out[module + suffix] = value
            out[module + INDEX] = torch.tensor(idx, dtype=torch.int64)
        return out

    def _allowed(self, module: str, prev: dict[str, torch.Tensor]) -> list[int]:
        if INDEX in prev:  # a compact download (at an edge): what was sent down
            return prev[INDEX].tolist()
        return self._active_of(module, int(prev[Q_SUFFIX].shape[0]))  # the full global state (at the cloud)

    def validate_update(self, tier: Tier, state: AdapterState, previous: AdapterState, source: str) -> None:
        modules, others = split_state(state)
        prev_modules, prev_others = split_state(previous)
        if set(others) != set(prev_others):
            missing, extra = sorted(set(prev_others) - set(others)), sorted(set(others) - set(prev_others))
            raise InvalidInput(f"update from {source}: tensors differ (missing {missing[:3]}, unexpected {extra[:3]})")
        for key, value in others.items():
            if tuple(value.shape) != tuple(previous[key].shape) or not float_ok(value):
                raise InvalidInput(f"update from {source}: '{key}' must be a finite float tensor of shape "
                                 f"{list(previous[key].shape)}")
        for module, parts in modules.items():
            prev = prev_modules.get(module)
            if prev is None or Q_SUFFIX not in prev:
                raise InvalidInput(f"update from {source}: module '{module}' was not sent (pruned or unknown)")
            check_module_update(module, parts, prev, set(self._allowed(module, prev)), source)

    def aggregate(self, tier: Tier, updates: list[AdapterUpdate], previous: AdapterState) -> AdapterState:
        """Per triplet: the sample-weighted mean over the updates holding it; the others keep ``previous``.

        ``previous`` is full (the cloud's global state: the result is full) or compact with
        ``<module>.rank_index`` (an edge's download: the result holds the triplets its users trained,
        with their scores and ``<module>.rank_samples``).
        """
        if not updates:
            raise AggregationError("no updates to aggregate")
        ordered = sorted(updates, key=lambda u: u.source)
        prev_modules, prev_others = split_state(previous)
        upd_modules = [split_state(u.state)[0] for u in ordered]
        unknown = {m for mods in upd_modules for m in mods} - set(prev_modules)
        if unknown:
            raise AggregationError(f"updates hold modules that were not sent: {sorted(unknown)[:3]}")
        out: AdapterState = {}
        for key, value in prev_others.items():
            holders = [u for u in ordered if key in u.state]
            total = sum(u.num_samples for u in holders)
            if not holders or total <= 0:
                out[key] = value.clone()
                continue
            acc = torch.zeros(value.shape, dtype=torch.float64)
            for u in holders:
                acc += u.state[key].to(torch.float64) * u.num_samples
            out[key] = (acc / total).to(value.dtype)
        for module, prev in sorted(prev_modules.items()):
            compact_prev = INDEX in prev
            q0, p0, e0 = (prev[s] for s in FACTORS)
            prev_idx = prev[INDEX].tolist() if compact_prev else list(range(q0.shape[0]))
            if not compact_prev:
                self._learn(module, len(prev_idx), tier)
            pos = {g: i for i, g in enumerate(prev_idx)}
            n = len(prev_idx)
            acc = {Q_SUFFIX: torch.zeros(q0.shape, dtype=torch.float64), P_SUFFIX: torch.zeros(p0.shape, dtype=torch.float64),
                   E_SUFFIX: torch.zeros(e0.shape, dtype=torch.float64)}
            acc_score = torch.zeros(n, dtype=torch.float64)
            weight = torch.zeros(n, dtype=torch.float64)
            for u, mods in zip(ordered, upd_modules):
                parts = mods.get(module)
                if parts is None:
                    continue
                try:
                    where = torch.tensor([pos[g] for g in parts[INDEX].tolist()], dtype=torch.long)
                except KeyError:
                    raise AggregationError(f"update from {u.source}: '{module}' holds triplets that were not sent") from None
                w = parts[SAMPLES].to(torch.float64) if SAMPLES in parts else \
                    torch.full((len(where),), float(u.num_samples), dtype=torch.float64)
                acc[Q_SUFFIX].index_add_(0, where, parts[Q_SUFFIX].to(torch.float64) * w[:, None])
                acc[P_SUFFIX].index_add_(1, where, parts[P_SUFFIX].to(torch.float64) * w[None, :])
                acc[E_SUFFIX].index_add_(0, where, parts[E_SUFFIX].to(torch.float64) * w[:, None])
                acc_score.index_add_(0, where, parts[SCORE].to(torch.float64) * w)
                weight.index_add_(0, where, w)
            held = weight > 0
            safe = torch.where(held, weight, torch.ones_like(weight))
            merged = {Q_SUFFIX: torch.where(held[:, None], acc[Q_SUFFIX] / safe[:, None], q0.to(torch.float64)),
                      P_SUFFIX: torch.where(held[None, :], acc[P_SUFFIX] / safe[None, :], p0.to(torch.float64)),
                      E_SUFFIX: torch.where(held[:, None], acc[E_SUFFIX] / safe[:, None], e0.to(torch.float64))}
            score = acc_score / safe
            if compact_prev:  # at an edge: pass up only what its users trained
                if not bool(held.any()):
                    continue
                keep = held.nonzero().reshape(-1)
                out[module + Q_SUFFIX] = merged[Q_SUFFIX][keep].to(q0.dtype)
                out[module + P_SUFFIX] = merged[P_SUFFIX][:, keep].to(p0.dtype)
                out[module + E_SUFFIX] = merged[E_SUFFIX][keep].to(e0.dtype)
                out[module + INDEX] = torch.tensor(prev_idx, dtype=torch.int64)[keep]
                out[module + SCORE] = score[keep].float()
                out[module + SAMPLES] = weight[keep].float()
            else:  # at the cloud: back into the full global tensors
                for suffix, value in merged.items():
                    out[module + suffix] = value.to(prev[suffix].dtype)
                self.round_scores[module] = torch.where(held, score, torch.full_like(score, float("nan")))
        return out

    def after_round(self, round_id: int, metrics: dict[str, Any]) -> None:
        """Aggregated scores in; the next round's triplets out (each budgeted tier's share of the schedule)."""
        self.completed += 1
        for tier in sorted({self.tier_of.get(m, "") for m in self.round_scores}):
            fresh = {m: f for m, f in self.round_scores.items() if self.tier_of.get(m, "") == tier}
            self.scores.update(smooth_scores(self.scores, fresh, self.config.score_beta))
        self.round_scores = {}
        if not self.full_rank:
            return
        before = {m: self._active_of(m, r) for m, r in sorted(self.full_rank.items())}
        current = {m: initial_triplets(self.config, r) for m, r in sorted(self.full_rank.items())}
        budgets: dict[str, int] = {}
        for tier, (initial, target) in self.budgets().items():
            budget = budget_schedule(self.completed + 1, self.config.total_rounds, self.config.warmup_rounds,
                                     self.config.final_rounds, initial, target)
            budgets[tier] = budget
            candidates = [(m, i) for m, idx in current.items() if self.tier_of[m] == tier for i in idx]
            if budget < len(candidates):
                kept = set(rank_triplets(candidates, self.scores)[:budget])
                current.update({m: [i for i in current[m] if (m, i) in kept] for m, _ in candidates})
        self.active = current
        revived = sum(len(set(current[m]) - set(before[m])) for m in current)
        summary = {"next_round": self.completed + 1, "budget": budgets, "active": sum(len(v) for v in current.values()),
                   "active_by_tier": {t: sum(len(v) for m, v in current.items() if self.tier_of[m] == t)
                                      for t in sorted(set(self.tier_of.values()))},
                   "revived": revived, "modules": len(current),
                   "pruned_modules": sorted(m for m, v in current.items() if not v),
                   "ranks": {m: len(v) for m, v in current.items()}}
        self.history.append(summary)
        metrics["fedara"] = {k: v for k, v in summary.items() if k != "ranks"}


class FedARASession(SessionPlugin):
    """A session on one tier: its active triplets, the orthogonality penalty, importance scores, compact updates."""

    config: FedARAConfig

    def __init__(self, config: FedARAConfig, ctx: SessionContext) -> None:
        super().__init__(config, ctx)
        self.indices: dict[str, list[int]] = {}
        self.tracker = ImportanceTracker(self.config.beta1, self.config.beta2)

    def _session_masks(self) -> dict[str, list[int]] | None:
        plan, store = self.plan, self.ctx.store
        masks = plan.extra.get("active") if plan.extra else None
        if masks is not None and not isinstance(masks, dict):
            raise InvalidInput("fedara: the plan's 'active' must map module names to index lists")
        if plan.training:
            store["active"] = masks
            return masks
        if masks is None:  # evaluation plans carry no extras: the round's training masks
            return store.get("active")
        return masks

    def build_adapters(self, state: AdapterState) -> dict[str, nn.Parameter]:
        tier = self.ctx.tier
        if self.ctx.spec is not None:
            require_svd(self.ctx.spec)
        shapes = self.ctx.shapes
        slot_modules, slot_others = split_state({k: torch.empty(0) for k in shapes})
        masks = self._session_masks()
        params: dict[str, nn.Parameter] = {}
        for key in slot_others:
            if key not in state:
                raise InvalidInput(f"{tier} adapters lack '{key}'")
            params[key] = nn.Parameter(state[key].detach().clone())
        for module in sorted(slot_modules):
            present = [s for s in FACTORS if module + s in state]
            if not present:  # pruned: the layer runs without its adapter
                continue
            if len(present) != len(FACTORS):
                raise InvalidInput(f"{tier} adapters hold only {present} of module '{module}'")
            rank = int(shapes[module + Q_SUFFIX][0])
            factors = {s: state[module + s] for s in FACTORS}
            held = int(factors[Q_SUFFIX].shape[0])
            if masks is not None and module in masks:
                idx = check_indices(masks[module], rank, f"fedara plan, module '{module}'")
            else:
                idx = initial_triplets(self.config, rank) if held == rank else list(range(held))
            if not idx:
                continue
            if held == rank and len(idx) < rank:
                factors = compact(factors, idx)
            elif held != len(idx):
                if self.plan.training:
                    raise InvalidInput(f"fedara: module '{module}' arrived with {held} triplets, the plan lists {len(idx)}")
                idx = list(range(held))  # evaluation of a compact download: the order of triplets does not matter
            self.indices[module] = idx
            for suffix, value in factors.items():
                params[module + suffix] = nn.Parameter(value.detach().clone())
        return params

    def lr_scales(self) -> dict[str, float]:
        return {"svd_e": self.config.e_lr_scale}

    def extra_loss(self, params: dict[str, nn.Parameter]) -> torch.Tensor | None:
        if not self.config.ortho_weight or not self.indices:
            return None
        total = sum(orthogonality_penalty(params[m + P_SUFFIX], params[m + Q_SUFFIX]) for m in sorted(self.indices))
        return self.config.ortho_weight * total

    def after_backward(self, params: dict[str, nn.Parameter]) -> None:
        for key, param in params.items():
            if module_of(key) is not None:
                self.tracker.update(key, param)

    def pack_update(self, params: dict[str, nn.Parameter]) -> AdapterState:
        out = {k: p.detach().clone() for k, p in params.items()}
        for module, idx in sorted(self.indices.items()):
            q, p, e = (params[module + s] for s in FACTORS)
            scores = triplet_scores(self.tracker.entry_scores(module + Q_SUFFIX, q),
                                    self.tracker.entry_scores(module + P_SUFFIX, p),
                                    self.tracker.entry_scores(module + E_SUFFIX, e))
            out[module + INDEX] = torch.tensor(idx, dtype=torch.int64)
            out[module + SCORE] = scores.detach().float().cpu()
        return out


FEDARA = register_algorithm("fedara", config=FedARAConfig, strategy=FedARAStrategy, session=FedARASession)
