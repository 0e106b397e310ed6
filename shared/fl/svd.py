"""Truncated-SVD adapter pieces FedARA builds on: triplets, importance scores, the rank budget, compact tensors."""

from __future__ import annotations

from typing import Any

import torch

from shared.config.deployment import ModelSpec
from shared.errors import InvalidInput
from shared.model.adapters import AdapterState


Q_SUFFIX, P_SUFFIX, E_SUFFIX = ".lora_A", ".lora_B", ".lora_E"


FACTORS = (Q_SUFFIX, P_SUFFIX, E_SUFFIX)


INDEX, SCORE, SAMPLES = ".rank_index", ".rank_score", ".rank_samples"


EXTRAS = (INDEX, SCORE, SAMPLES)


def require_svd(spec: ModelSpec) -> None:
    """FedARA's adapters are the SVD form: refuse a deployment of another form with a clear error."""
    if spec.adapter != "svd":
        raise InvalidInput(f"fedara trains truncated-SVD adapters (P diag(e) Q): this deployment uses adapter "
                           f"'{spec.adapter}'; start it with --adapter svd (SimConfig(adapter='svd'))")


def module_of(key: str) -> tuple[str, str] | None:
    """``(module, suffix)`` for a factor or FedARA extra key, None for anything else (head tensors)."""
    for suffix in FACTORS + EXTRAS:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def split_state(state: AdapterState) -> tuple[dict[str, dict[str, torch.Tensor]], AdapterState]:
    """Group a state into ``{module: {suffix: tensor}}`` and the other (head) tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    others: AdapterState = {}
    for key, value in state.items():
        found = module_of(key)
        if found is None:
            others[key] = value
        else:
            modules.setdefault(found[0], {})[found[1]] = value
    return modules, others


def orthogonality_penalty(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 for P (d x k) and Q (k x n): k active triplets."""
    k = P.shape[1]
    eye = torch.eye(k, dtype=P.dtype, device=P.device)
    return (P.T @ P - eye).square().sum() + (Q @ Q.T - eye).square().sum()


def budget_schedule(round_number: int, total_rounds: int, warmup_rounds: int, final_rounds: int,
                    initial: int, target: int) -> int:
    """Active triplets allowed in round ``round_number`` (1-based): warm-up, cubic decay, final rounds."""
    if round_number <= warmup_rounds:
        return initial
    decay_end = total_rounds - final_rounds
    if round_number > decay_end:
        return target
    decay_rounds = decay_end - warmup_rounds
    k = round_number - warmup_rounds
    return int(round(target + (initial - target) * (1.0 - k / (decay_rounds + 1)) ** 3))


def triplet_scores(s_q: torch.Tensor, s_p: torch.Tensor, s_e: torch.Tensor) -> torch.Tensor:
    """Per-triplet importance from per-entry scores of Q (k x n), P (d x k) and e (k x 1)."""
    return s_e.reshape(-1) + s_q.mean(dim=1) + s_p.mean(dim=0)


def smooth_scores(old: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    """One round of the coordinator's moving average of the triplet scores of one tier's modules.

    ``fresh`` holds this round's aggregated scores, NaN where no one held the triplet (masked). A
    held triplet: ``beta * old + (1 - beta) * fresh``. A masked triplet cannot be scored (it is
    neither trained nor sent), so its fresh score is taken as its average times the rate the tier's
    held triplets' scores moved (the sum of their fresh scores over the sum of their averages), and
    smoothed like theirs: its average moves as far as the held triplets' averages moved together.
    It keeps its place against the tier as a whole, and an active triplet that falls behind the tier
    can fall below it (the masked one then comes back). Carrying it at the fresh rate without the
    smoothing would let every masked triplet overtake the held ones whenever scores rise, as they
    do while e grows from zero: the allocation would churn on the rise, not on the ranking.
    Decaying it instead, as AdaLoRA's zero sensitivity would, keeps every masked triplet below
    every kept one for ever. A module's first scores are taken as they are.
    """
    fresh = {m: f.to(torch.float64) for m, f in fresh.items()}
    known = {m: old[m].to(torch.float64) for m in fresh if m in old and old[m].shape == fresh[m].shape}
    num = sum(float(torch.nan_to_num(f, nan=0.0).sum()) for m, f in fresh.items() if m in known)
    den = sum(float(known[m][~torch.isnan(f)].sum()) for m, f in fresh.items() if m in known)
    trend = beta + (1.0 - beta) * num / den if den > 0 else 1.0  # how far the held triplets' averages moved
    out = {}
    for module, f in fresh.items():
        if module not in known:
            out[module] = torch.nan_to_num(f, nan=0.0)
            continue
        prev = known[module]
        out[module] = torch.where(torch.isnan(f), prev * trend, beta * prev + (1.0 - beta) * f)
    return out


class ImportanceTracker:
    """AdaLoRA's smoothed sensitivity and uncertainty, per tensor, over the steps of one session."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, key: str, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        ipt = (param.detach() * param.grad.detach()).abs().float()
        avg = self.ipt.get(key, torch.zeros_like(ipt)).mul(self.beta1).add_(ipt, alpha=1 - self.beta1)
        unc = self.unc.get(key, torch.zeros_like(ipt)).mul(self.beta2).add_((ipt - avg).abs(), alpha=1 - self.beta2)
        self.ipt[key], self.unc[key] = avg, unc

    def entry_scores(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.ipt:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return self.ipt[key] * self.unc[key]


def compact(factors: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    """The rows of Q and e and the columns of P of triplets ``idx``."""
    index = torch.tensor(idx, dtype=torch.long, device=factors[Q_SUFFIX].device)
    return {Q_SUFFIX: factors[Q_SUFFIX].index_select(0, index), P_SUFFIX: factors[P_SUFFIX].index_select(1, index),
            E_SUFFIX: factors[E_SUFFIX].index_select(0, index)}


def masked_state(state: AdapterState, active: dict[str, list[int]]) -> AdapterState:
    """The global state as FedARA's model sees it: e of masked triplets set to zero (for export)."""
    out = {k: v.clone() for k, v in state.items()}
    for key, value in state.items():
        found = module_of(key)
        if found is None or found[1] != E_SUFFIX or found[0] not in active:
            continue
        keep = torch.zeros(value.shape[0], dtype=torch.bool)
        keep[list(active[found[0]])] = True
        out[key][~keep] = 0
    return out


def check_indices(idx: Any, rank: int, where: str) -> list[int]:
    if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise InvalidInput(f"{where}: active triplets must be a list of integers")
    idx = list(idx)
    if any(i < 0 or i >= rank for i in idx) or any(a >= b for a, b in zip(idx, idx[1:])):
        raise InvalidInput(f"{where}: active triplets must be strictly increasing indices in [0, {rank})")
    return idx


def rank_triplets(candidates: list[tuple[str, int]], scores: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """Triplets ``(module, index)`` best first by their moving-average score (unscored: 0; ties by name)."""
    def score_of(mi: tuple[str, int]) -> float:
        s = scores.get(mi[0])
        return float(s[mi[1]]) if s is not None and mi[1] < len(s) else 0.0

    return sorted(candidates, key=lambda mi: (-score_of(mi), mi[0], mi[1]))


def check_module_update(module: str, parts: dict[str, torch.Tensor], prev: dict[str, torch.Tensor], allowed: set[int],
                        source: str) -> None:
    """One module of an arriving compact update: factors, indices among ``allowed``, scores, all well shaped."""
    needed = set(FACTORS) | {INDEX, SCORE}
    if not needed <= set(parts):
        raise InvalidInput(f"update from {source}: module '{module}' lacks {sorted(needed - set(parts))}")
    index = parts[INDEX]
    if index.dtype not in (torch.int64, torch.int32, torch.int16) or index.dim() != 1 or index.numel() == 0:
        raise InvalidInput(f"update from {source}: '{module}{INDEX}' must be a non-empty 1-d integer tensor")
    idx = index.tolist()
    if any(a >= b for a, b in zip(idx, idx[1:])) or not set(idx) <= allowed:
        raise InvalidInput(f"update from {source}: '{module}{INDEX}' must list increasing indices of triplets "
                           f"that were sent for training")
    k = len(idx)
    want = {Q_SUFFIX: (k, prev[Q_SUFFIX].shape[1]), P_SUFFIX: (prev[P_SUFFIX].shape[0], k), E_SUFFIX: (k, 1),
            SCORE: (k,), SAMPLES: (k,)}
    for suffix, value in parts.items():
        if suffix == INDEX:
            continue
        if tuple(value.shape) != tuple(want[suffix]) or not float_ok(value):
            raise InvalidInput(f"update from {source}: '{module}{suffix}' must be a finite float tensor of "
                               f"shape {list(want[suffix])}")
        if suffix in (SCORE, SAMPLES) and bool((value < 0).any()):
            raise InvalidInput(f"update from {source}: '{module}{suffix}' must not be negative")


def float_ok(value: torch.Tensor) -> bool:
    return value.is_floating_point() and bool(torch.isfinite(value).all())
