"""Round plans for tests of the hooks and tiers: the round settings a real plan gets from its RoundConfig."""

from __future__ import annotations

from typing import Any

from shared.protocol.messages import RoundPlan


def make_plan(round_id: int = 1, user_id: str = "u", **fields: Any) -> RoundPlan:
    """A plan with small round settings (2 steps of 2 examples, lr 1e-3) unless ``fields`` say otherwise."""
    settings: dict[str, Any] = {"local_steps": 2, "batch_size": 2, "lr": 1e-3, **fields}
    return RoundPlan(round_id=round_id, user_id=user_id, **settings)
