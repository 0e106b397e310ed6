"""A round as the cloud records it: its configuration, state, participants' progress and metrics."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from shared.config.round import RoundConfig

ROUND_STATES = ("pending", "running", "aggregating", "committed", "failed", "cancelled")
FINISHED = ("committed", "failed", "cancelled")


@dataclass
class RoundRecord:
    round_id: int
    request: RoundConfig
    base_version: int
    state: str = "pending"
    version: int | None = None
    participants: list[str] = field(default_factory=list)
    progress: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "request": self.request.to_dict(), "base_version": self.base_version,
                "state": self.state, "version": self.version, "participants": list(self.participants),
                "progress": dict(self.progress), "metrics": copy.deepcopy(self.metrics), "error": self.error}


class RoundError(RuntimeError):
    """A round could not complete; the previous version stays current."""


class RoundCancelled(RoundError):
    """Cancelled through the API; the previous version stays current."""
