"""Sample-weighted FedAvg, flat and hierarchical, independent of arrival order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import InvalidInput
from shared.model.adapters import AdapterState


@dataclass
class AdapterUpdate:
    """One contribution to an aggregate: a tier's adapter state from ``source`` over ``num_samples``."""

    source: str
    tier: str
    state: AdapterState
    num_samples: int


class AggregationError(InvalidInput):
    """Updates cannot be combined (no samples, mismatched keys or shapes)."""


def weighted_mean(updates: list[AdapterUpdate]) -> AdapterState:
    """Sum of w_k * x_k / sum w_k, accumulated in float64 in a fixed order (sorted by source)."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    ordered = sorted(updates, key=lambda u: u.source)
    total = sum(u.num_samples for u in ordered)
    if total <= 0:
        raise AggregationError("updates carry no samples")
    keys = sorted(ordered[0].state)
    for u in ordered[1:]:
        if sorted(u.state) != keys:
            raise AggregationError(f"update from {u.source} has different adapter keys")
    out: AdapterState = {}
    for key in keys:
        ref = ordered[0].state[key]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u in ordered:
            value = u.state[key]
            if value.shape != ref.shape:
                raise AggregationError(f"update from {u.source}: '{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
            acc += value.to(torch.float64) * u.num_samples
        out[key] = (acc / total).to(ref.dtype)
    return out


def check_update(state: AdapterState, expected: AdapterState, source: str) -> None:
    """Refuse an update whose keys, shapes or values cannot join the aggregate (``InvalidInput``: HTTP 422)."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise InvalidInput(f"update from {source}: adapter keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InvalidInput(f"update from {source}: '{key}' has shape {list(value.shape)}, "
                             f"expected {list(expected[key].shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise InvalidInput(f"update from {source}: '{key}' is not a finite float tensor")


def clip_updates(updates: list[AdapterUpdate], previous: AdapterState, max_norm: float | None) -> list[AdapterUpdate]:
    """Scale each update's change from ``previous`` down to at most ``max_norm`` (L2 over all its tensors)."""
    if not max_norm:
        return updates
    out = []
    for u in updates:
        if any(k not in previous or previous[k].shape != v.shape for k, v in u.state.items()):
            raise InvalidInput(f"clip_norm needs updates shaped like the global adapters; {u.source}'s are not "
                             f"(compact updates, e.g. FedARA's, are not clipped: leave clip_norm unset)")
        deltas = {k: v.to(torch.float64) - previous[k].to(torch.float64) for k, v in u.state.items()}
        norm = float(torch.sqrt(sum((d * d).sum() for d in deltas.values())))
        if norm <= max_norm:
            out.append(u)
            continue
        scale = max_norm / norm
        state = {k: (previous[k].to(torch.float64) + d * scale).to(u.state[k].dtype) for k, d in deltas.items()}
        out.append(AdapterUpdate(u.source, u.tier, state, u.num_samples))
    return out
