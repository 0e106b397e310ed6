"""Aggregation one client cannot capture: norm clipping (absolute and relative to the median) and robust means.

Applied wherever updates are combined (an edge over its users, the cloud over its edges' reports and
its own per-user replicas), before the algorithm's own ``aggregate``:

1. ``clip_norm`` (absolute, optional): each update's change from the previous state is scaled down to
   at most this L2 norm.
2. ``clip_factor`` (relative, default 3): with at least ``MIN_FOR_RELATIVE`` (3) updates, each update's
   change is scaled down to at most ``clip_factor`` times the median change norm of the updates being
   combined. An honest update of the same round is rarely far from the others; one client's update can
   then move the aggregate by at most ``clip_factor * median * its weight / total weight``. With fewer
   updates the median cannot tell an outlier, so only the absolute bound applies.
3. ``aggregator``: ``mean`` (the algorithm's own, FedAvg's sample-weighted mean by default), or the
   coordinate-wise ``median`` or ``trimmed_mean`` (dropping the ``trim`` share of the largest and of the
   smallest values of every coordinate), both unweighted, as the robust-aggregation literature defines them.

Clipping and the robust aggregators need updates shaped like the previous state; compact updates (FedARA's
active triplets) are combined by their algorithm alone, unclipped.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.fl.aggregation import AdapterUpdate, AggregationError
from shared.model.adapters import AdapterState

AGGREGATORS = ("mean", "median", "trimmed_mean")
MIN_FOR_RELATIVE = 3


@dataclass(frozen=True)
class AggregationPolicy:
    """How updates are combined at one aggregation point; travels in a round's start to the edges."""

    clip_norm: float | None = None
    clip_factor: float | None = 3.0
    aggregator: str = "mean"
    trim: float = 0.2

    def to_meta(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "clip_factor": self.clip_factor, "aggregator": self.aggregator,
                "trim": self.trim}


@dataclass
class Combined:
    """An aggregate and what the policy did on the way: the clip bound, whose updates it scaled down."""

    state: AdapterState
    bound: float | None = None
    clipped: list[str] = field(default_factory=list)


def full_shaped(updates: list[AdapterUpdate], previous: AdapterState) -> bool:
    """Every update holds exactly the previous state's keys and shapes (not a compact update)."""
    return all(u.state.keys() == previous.keys() and all(previous[k].shape == v.shape for k, v in u.state.items())
               for u in updates)


def change_norm(update: AdapterUpdate, previous: AdapterState) -> float:
    return float(torch.sqrt(sum(((v.to(torch.float64) - previous[k].to(torch.float64)) ** 2).sum()
                                for k, v in update.state.items())))


def scaled(update: AdapterUpdate, previous: AdapterState, factor: float) -> AdapterUpdate:
    state = {k: (previous[k].to(torch.float64) + (v.to(torch.float64) - previous[k].to(torch.float64)) * factor)
             .to(v.dtype) for k, v in update.state.items()}
    return AdapterUpdate(update.source, update.tier, state, update.num_samples)


def clip(updates: list[AdapterUpdate], previous: AdapterState, policy: AggregationPolicy) -> Combined:
    """The policy's clipping (absolute, then relative to the median); ``state`` is left empty."""
    norms = {u.source: change_norm(u, previous) for u in updates}
    bounds = [policy.clip_norm] if policy.clip_norm else []
    if policy.clip_factor and len(updates) >= MIN_FOR_RELATIVE:
        bounds.append(policy.clip_factor * statistics.median(norms.values()))
    bound = min(bounds) if bounds else None
    result = Combined({}, bound)
    if bound is None:
        return result
    for i, u in enumerate(updates):
        if norms[u.source] > bound:
            updates[i] = scaled(u, previous, bound / norms[u.source])
            result.clipped.append(u.source)
    return result


def coordinate_wise(updates: list[AdapterUpdate], kind: str, trim: float) -> AdapterState:
    """The coordinate-wise median, or mean of what remains after dropping ``trim`` of each end (unweighted)."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    ordered = sorted(updates, key=lambda u: u.source)
    out: AdapterState = {}
    for key, ref in ordered[0].state.items():
        stacked = torch.stack([u.state[key].to(torch.float64) for u in ordered])
        if kind == "median":
            value = stacked.median(dim=0).values if len(ordered) % 2 else stacked.quantile(0.5, dim=0)
        else:
            k = int(trim * len(ordered))
            value = stacked.sort(dim=0).values[k:len(ordered) - k].mean(dim=0)
        out[key] = value.to(ref.dtype)
    return out


def combine(strategy: Any, tier: Any, updates: list[AdapterUpdate], previous: AdapterState,
            policy: AggregationPolicy) -> Combined:
    """Clip, then aggregate with the policy's aggregator (``mean``: the strategy's own ``aggregate``)."""
    updates = list(updates)
    if not updates or not full_shaped(updates, previous):
        return Combined(strategy.aggregate(tier, updates, previous))
    result = clip(updates, previous, policy)
    if policy.aggregator == "mean":
        result.state = strategy.aggregate(tier, updates, previous)
    else:
        result.state = coordinate_wise(updates, policy.aggregator, policy.trim)
    return result
