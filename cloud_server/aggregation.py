"""The coordinator's aggregate of a round: every tier's updates combined, namespace by namespace, or the strategy's own."""

from __future__ import annotations

from typing import Any

from shared.fl.aggregation import AdapterUpdate
from shared.fl.plugin import Strategy
from shared.fl.robust import AggregationPolicy, combine_namespaces
from shared.model.adapters import AdapterState
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier


def aggregate_round(strategy: Strategy, updates_of: dict[Tier, list[AdapterUpdate]], base: AdapterBundle,
                    policy: AggregationPolicy) -> tuple[AdapterBundle, dict[str, Any]]:
    """The round's new global adapters: the strategy's own ``aggregate_round``, or each tier's updates combined
    namespace by namespace (a deployment's blocks over its users, a task's head over its users)."""
    own = strategy.aggregate_round(updates_of, base)
    if own is not None:
        return own, {}
    new_state: dict[Tier, AdapterState] = {}
    clipped: dict[str, Any] = {}
    for tier, updates in updates_of.items():
        if not base[tier]:
            new_state[tier] = {}
            continue
        combined = combine_namespaces(strategy, tier, updates, base[tier], policy)
        new_state[tier] = combined.state
        if combined.clipped:
            clipped[tier.value] = {"bound": combined.bound, "sources": combined.clipped}
    return AdapterBundle(new_state), clipped
