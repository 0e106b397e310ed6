"""Names every message and every tier agrees on: the tiers, the hops between them, a session's mode."""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    """Where a partition runs: the device, the relay, the coordinator."""

    USER = "user"
    EDGE = "edge"
    CLOUD = "cloud"


class Hop(StrEnum):
    """A link between two tiers (codec policies and byte counts are per hop)."""

    USER_EDGE = "user_edge"
    EDGE_CLOUD = "edge_cloud"


class Mode(StrEnum):
    """What a session does: train (forward, backward, optimizer step) or evaluate (forward only)."""

    TRAIN = "train"
    EVAL = "eval"


TIERS: tuple[Tier, ...] = tuple(Tier)
