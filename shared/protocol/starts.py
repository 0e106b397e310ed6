"""Round starts: the cloud's start of a round at an edge (its users' plans, the adapters, how the edge aggregates,
the cloud's revoked credentials and round tickets), and the edge's start of each user (``shared.protocol.messages``
describes the envelope and its checks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from shared.errors import InvalidInput
from shared.protocol.bundle import AdapterBundle, AdapterState
from shared.protocol.enums import Tier
from shared.protocol.fields import Json, as_int, as_map, as_number, as_str, check_fields, optional_number
from shared.protocol.messages import RoundPlan
from shared.protocol.wire import Message


AGGREGATORS = ("mean", "median", "trimmed_mean")


@dataclass
class RoundStart:
    """Cloud -> edge: the plans of the edge's chosen users, the global user- and edge-side adapters, how the edge
    combines its users' updates, and the weight of each user (the cloud's, never self-reported)."""

    KIND: ClassVar[str] = "start"
    plans: list[RoundPlan]
    adapters: AdapterBundle
    deadline: float | None = None
    clip_norm: float | None = None
    clip_factor: float | None = None
    aggregator: str = "mean"
    trim: float = 0.2
    weights: dict[str, int] = field(default_factory=dict)  # user id -> its weight in the aggregate
    revoked: Json | None = None  # the cloud's revoked credentials: {"jtis": [...], "subjects": {subject: before}}
    tickets: dict[str, Json] | None = None  # user id -> the cloud's signed ticket for its start (shared.http.tickets)

    def to_message(self, codec: Any = None) -> Message:
        tensors = self.adapters.tensors((Tier.USER, Tier.EDGE))
        meta = {"plans": [p.to_meta() for p in self.plans], "deadline": self.deadline, "clip_norm": self.clip_norm,
                "clip_factor": self.clip_factor, "aggregator": self.aggregator, "trim": self.trim,
                "weights": dict(self.weights)}
        for name in ("revoked", "tickets"):
            if getattr(self, name) is not None:
                meta[name] = getattr(self, name)
        return Message(kind=self.KIND, meta=meta, tensors=tensors, codecs=dict.fromkeys(tensors, codec) if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "RoundStart":
        check_fields("start", msg.meta, ("plans",),
                      ("deadline", "clip_norm", "clip_factor", "aggregator", "trim", "weights", "revoked", "tickets"))
        plans = msg.meta["plans"]
        if not isinstance(plans, list) or not plans:
            raise InvalidInput("a start message needs at least one plan")
        parsed = [RoundPlan.from_meta(p) for p in plans]
        if len({(p.round_id, p.mode) for p in parsed}) != 1:
            raise InvalidInput("the plans of one start message must share the round and mode")
        meta = msg.meta
        aggregator = meta.get("aggregator", "mean")
        if aggregator not in AGGREGATORS:
            raise InvalidInput(f"start.aggregator must be one of {', '.join(AGGREGATORS)}")
        trim = as_number(meta.get("trim", 0.2), "start.trim")
        if not 0 <= trim < 0.5:
            raise InvalidInput("start.trim must lie in [0, 0.5)")
        weights = {as_str(u, "a weight's user id"): as_int(w, f"start.weights.{str(u)[:40]}", 0)
                   for u, w in as_map(meta.get("weights", {}), "start.weights").items()}
        return cls(parsed, AdapterBundle.from_tensors(msg.tensors, (Tier.USER, Tier.EDGE)),
                   deadline=optional_number(meta, "deadline"), clip_norm=optional_number(meta, "clip_norm"),
                   clip_factor=optional_number(meta, "clip_factor"), aggregator=aggregator, trim=trim,
                   weights=weights, revoked=None if meta.get("revoked") is None else as_map(meta["revoked"], "start.revoked"),
                   tickets=None if meta.get("tickets") is None else as_map(meta["tickets"], "start.tickets"))


@dataclass
class UserStart:
    """Edge -> user: one user's plan, the global user-side adapters, and the cloud's ticket for this start (relayed)."""

    KIND: ClassVar[str] = "start"
    plan: RoundPlan
    adapters: AdapterState
    ticket: Json | None = None

    def to_message(self, codec: Any = None) -> Message:
        tensors = AdapterBundle({Tier.USER: self.adapters}).tensors()
        meta = {"plan": self.plan.to_meta()}
        if self.ticket is not None:
            meta["ticket"] = self.ticket
        return Message(kind=self.KIND, meta=meta, tensors=tensors, codecs=dict.fromkeys(tensors, codec) if codec else {})

    @staticmethod
    def plan_of(msg: Message) -> RoundPlan:
        """The start's plan alone (its adapters not read): what its ticket is checked against."""
        check_fields("start", msg.meta, ("plan",), ("ticket",))
        return RoundPlan.from_meta(msg.meta["plan"])

    @classmethod
    def from_message(cls, msg: Message) -> "UserStart":
        return cls(cls.plan_of(msg), AdapterBundle.from_tensors(msg.tensors, (Tier.USER,))[Tier.USER],
                   msg.meta.get("ticket"))
