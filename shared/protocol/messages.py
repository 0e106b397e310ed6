"""Typed messages between tiers: round plans, start, step request and reply, update, report.

Each type knows its ``kind``, its ``meta`` fields and its tensors, builds the envelope that
``shared.protocol.wire`` encodes, and parses a decoded envelope, refusing (422, ``InvalidInput``)
one that lacks a field, carries an unknown one or a value of the wrong type. The envelope's ``v``
versions these schemas together with the envelope: v1 is what this module reads and writes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from shared.errors import InvalidInput
from shared.protocol.bundle import AdapterBundle, AdapterState
from shared.protocol.enums import Mode, Tier
from shared.protocol.wire import Message

Json = dict[str, Any]


# -- field checks -------------------------------------------------------------------------------------------


def _lacks(kind: str, missing: list[str]) -> InvalidInput:
    return InvalidInput(f"{kind} message lacks {', '.join(missing)}")


def _check_fields(kind: str, meta: Json, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [f"meta.{k}" for k in required if k not in meta]
    if missing:
        raise _lacks(kind, missing)
    unknown = sorted(set(meta) - set(required) - set(optional))
    if unknown:
        raise InvalidInput(f"{kind} message has unknown field(s) {', '.join(f'meta.{k}' for k in unknown)[:200]}")


def _tensors(kind: str, msg: Message, names: tuple[str, ...]) -> list[torch.Tensor]:
    missing = [f"tensors.{n}" for n in names if n not in msg.tensors]
    if missing:
        raise _lacks(kind, missing)
    unknown = sorted(set(msg.tensors) - set(names))
    if unknown:
        raise InvalidInput(f"{kind} message has unknown tensor(s) {', '.join(unknown)[:200]}")
    return [msg.tensors[n] for n in names]


def as_int(value: Any, where: str, lo: int | None = None) -> int:
    if type(value) is not int or (lo is not None and value < lo):
        raise InvalidInput(f"{where} must be an integer{f' >= {lo}' if lo is not None else ''} (got {str(value)[:40]!r})")
    return value


def as_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where} must be a non-empty string")
    return value


def as_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{where} must be a finite number (got {str(value)[:40]!r})")
    return float(value)


def as_mode(value: Any, where: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise InvalidInput(f"{where} must be one of {', '.join(m.value for m in Mode)} (got {str(value)[:40]!r})") from None


def as_map(value: Any, where: str) -> Json:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a map")
    return value


# -- round plans ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RoundPlan:
    """What one participant does in one round; travels as msgpack metadata, never as code.

    Made by the coordinator from the round's configuration (``shared.config.round.RoundConfig``),
    which declares the defaults: a plan has none of its own for the round's settings.
    """

    round_id: int
    user_id: str
    local_steps: int
    batch_size: int
    lr: float
    seed: int = 0
    algorithm: str = "fedavg"
    config: Json = field(default_factory=dict)
    extra: Json = field(default_factory=dict)  # per-participant plug-in data (ratios, masks, ...)
    mode: Mode = Mode.TRAIN

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)

    @property
    def training(self) -> bool:
        return self.mode is Mode.TRAIN

    def to_meta(self) -> Json:
        meta = dataclasses.asdict(self)
        meta["mode"] = self.mode.value
        return meta

    @classmethod
    def from_meta(cls, meta: Any) -> "RoundPlan":
        meta = as_map(meta, "a round plan")
        names = tuple(f.name for f in dataclasses.fields(cls))
        _check_fields("round plan", meta, names[:5], names[5:])
        return cls(
            round_id=as_int(meta["round_id"], "plan.round_id", 0), user_id=as_str(meta["user_id"], "plan.user_id"),
            local_steps=as_int(meta["local_steps"], "plan.local_steps", 1),
            batch_size=as_int(meta["batch_size"], "plan.batch_size", 1), lr=as_number(meta["lr"], "plan.lr"),
            seed=as_int(meta.get("seed", 0), "plan.seed"), algorithm=as_str(meta.get("algorithm", "fedavg"), "plan.algorithm"),
            config=as_map(meta.get("config", {}), "plan.config"), extra=as_map(meta.get("extra", {}), "plan.extra"),
            mode=as_mode(meta.get("mode", "train"), "plan.mode"))


# -- start ----------------------------------------------------------------------------------------------------


@dataclass
class RoundStart:
    """Cloud -> edge: the plans of the edge's chosen users, the global user- and edge-side adapters."""

    KIND: ClassVar[str] = "start"
    plans: list[RoundPlan]
    adapters: AdapterBundle
    deadline: float | None = None
    clip_norm: float | None = None

    def to_message(self, codec: Any = None) -> Message:
        tensors = self.adapters.tensors((Tier.USER, Tier.EDGE))
        meta = {"plans": [p.to_meta() for p in self.plans], "deadline": self.deadline, "clip_norm": self.clip_norm}
        return Message(kind=self.KIND, meta=meta, tensors=tensors, codecs=dict.fromkeys(tensors, codec) if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "RoundStart":
        _check_fields("start", msg.meta, ("plans",), ("deadline", "clip_norm"))
        plans = msg.meta["plans"]
        if not isinstance(plans, list) or not plans:
            raise InvalidInput("a start message needs at least one plan")
        parsed = [RoundPlan.from_meta(p) for p in plans]
        if len({(p.round_id, p.mode) for p in parsed}) != 1:
            raise InvalidInput("the plans of one start message must share the round and mode")
        deadline, clip = msg.meta.get("deadline"), msg.meta.get("clip_norm")
        return cls(parsed, AdapterBundle.from_tensors(msg.tensors, (Tier.USER, Tier.EDGE)),
                   deadline=None if deadline is None else as_number(deadline, "start.deadline"),
                   clip_norm=None if clip is None else as_number(clip, "start.clip_norm"))


@dataclass
class UserStart:
    """Edge -> user: one user's plan and the global user-side adapters."""

    KIND: ClassVar[str] = "start"
    plan: RoundPlan
    adapters: AdapterState

    def to_message(self, codec: Any = None) -> Message:
        tensors = AdapterBundle({Tier.USER: self.adapters}).tensors()
        return Message(kind=self.KIND, meta={"plan": self.plan.to_meta()}, tensors=tensors,
                       codecs=dict.fromkeys(tensors, codec) if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "UserStart":
        _check_fields("start", msg.meta, ("plan",))
        return cls(RoundPlan.from_meta(msg.meta["plan"]), AdapterBundle.from_tensors(msg.tensors, (Tier.USER,))[Tier.USER])


# -- steps ------------------------------------------------------------------------------------------------------


@dataclass
class StepRequest:
    """One step's activations across a cut: real-token rows ``hidden`` (tokens x width), the mask, the labels."""

    KIND: ClassVar[str] = "step"
    round: int
    user: str
    step: int
    mode: Mode
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to_message(self, hidden_codec: Any = None) -> Message:
        return Message(kind=self.KIND, meta={"round": self.round, "user": self.user, "step": self.step,
                                             "mode": Mode(self.mode).value},
                       tensors={"hidden": self.hidden, "attention_mask": self.attention_mask, "labels": self.labels},
                       codecs={"hidden": hidden_codec} if hidden_codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "StepRequest":
        meta = msg.meta
        _check_fields("step", meta, ("round", "user", "step", "mode"))
        hidden, mask, labels = _tensors("step", msg, ("hidden", "attention_mask", "labels"))
        return cls(round=as_int(meta["round"], "meta.round", 0), user=as_str(meta["user"], "meta.user"),
                   step=as_int(meta["step"], "meta.step", 0), mode=as_mode(meta["mode"], "meta.mode"),
                   hidden=hidden, attention_mask=mask, labels=labels)


@dataclass
class TrainReply:
    """The reply to a training step: the gradient of the request's ``hidden`` (same shape) and the loss."""

    KIND: ClassVar[str] = "grad"
    loss: float
    grad: torch.Tensor

    def to_message(self, codecs: dict[str, Any] | None = None) -> Message:
        return Message(kind=self.KIND, meta={"loss": self.loss}, tensors={"grad": self.grad}, codecs=dict(codecs or {}))

    @classmethod
    def from_message(cls, msg: Message) -> "TrainReply":
        _check_fields("step reply", msg.meta, ("loss",))
        (grad,) = _tensors("step reply", msg, ("grad",))
        return cls(loss=as_number(msg.meta["loss"], "meta.loss"), grad=grad)


@dataclass
class EvalReply:
    """The reply to an evaluation step: the loss summed over ``count`` tokens or examples, and the correct ones."""

    KIND: ClassVar[str] = "eval"
    loss_sum: float
    count: int
    correct: int

    def to_message(self) -> Message:
        return Message(kind=self.KIND, meta={"loss_sum": self.loss_sum, "count": self.count, "correct": self.correct})

    @classmethod
    def from_message(cls, msg: Message) -> "EvalReply":
        _check_fields("eval reply", msg.meta, ("loss_sum", "count", "correct"))
        _tensors("eval reply", msg, ())
        return cls(loss_sum=as_number(msg.meta["loss_sum"], "meta.loss_sum"),
                   count=as_int(msg.meta["count"], "meta.count", 0), correct=as_int(msg.meta["correct"], "meta.correct", 0))


# -- updates and reports ----------------------------------------------------------------------------------------


@dataclass
class Update:
    """User -> edge at the end of its part of a round: its trained user-side adapters (training) and metrics."""

    KIND: ClassVar[str] = "update"
    round: int
    user: str
    mode: Mode
    num_samples: int
    metrics: Json
    adapters: AdapterState = field(default_factory=dict)

    @classmethod
    def failure(cls, round_id: int, user: str, mode: Mode, reason: str) -> "Update":
        """A user that could not do its part: its edge drops it at once instead of waiting for the deadline."""
        return cls(round_id, user, mode, 0, {"error": reason[:500]})

    @property
    def error(self) -> str | None:
        """Why the user could not do its part (a failure notice), None for a real update."""
        error = self.metrics.get("error")
        return str(error) if error is not None and not self.adapters else None

    def to_message(self, codec: Any = None) -> Message:
        tensors = AdapterBundle({Tier.USER: self.adapters}).tensors()
        meta = {"round": self.round, "user": self.user, "mode": Mode(self.mode).value, "num_samples": self.num_samples,
                "metrics": self.metrics}
        return Message(kind=self.KIND, meta=meta, tensors=tensors, codecs=dict.fromkeys(tensors, codec) if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "Update":
        meta = msg.meta
        _check_fields("update", meta, ("round", "user", "mode", "num_samples", "metrics"))
        mode = as_mode(meta["mode"], "meta.mode")
        return cls(round=as_int(meta["round"], "meta.round", 0), user=as_str(meta["user"], "meta.user"), mode=mode,
                   num_samples=as_int(meta["num_samples"], "meta.num_samples", 0),
                   metrics=as_map(meta["metrics"], "meta.metrics"),
                   adapters=AdapterBundle.from_tensors(msg.tensors, (Tier.USER,))[Tier.USER])


@dataclass
class Report:
    """Edge -> cloud once its users have reported or been dropped: pre-averaged adapters and per-user metrics."""

    KIND: ClassVar[str] = "update"
    round: int
    edge: str
    mode: Mode
    num_samples: int
    metrics: dict[str, Json]
    missing: list[str] = field(default_factory=list)
    adapters: AdapterBundle = field(default_factory=AdapterBundle)
    bytes: dict[str, int] | None = None  # the user-edge hop's bytes for this (round, mode), where measured

    def to_message(self, codec: Any = None) -> Message:
        tensors = self.adapters.tensors()
        meta: Json = {"round": self.round, "edge": self.edge, "mode": Mode(self.mode).value,
                      "num_samples": self.num_samples, "metrics": self.metrics, "missing": list(self.missing)}
        if self.bytes is not None:
            meta["bytes"] = dict(self.bytes)
        return Message(kind=self.KIND, meta=meta, tensors=tensors, codecs=dict.fromkeys(tensors, codec) if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "Report":
        meta = msg.meta
        _check_fields("report", meta, ("round", "edge", "mode", "num_samples", "metrics", "missing"), ("bytes",))
        metrics = as_map(meta["metrics"], "meta.metrics")
        for user, m in metrics.items():
            as_map(m, f"meta.metrics.{user[:40]}")
        missing = meta["missing"]
        if not isinstance(missing, list) or not all(isinstance(u, str) for u in missing):
            raise InvalidInput("meta.missing must be a list of user ids")
        counted = meta.get("bytes")
        if counted is not None:
            counted = {d: as_int(as_map(counted, "meta.bytes").get(d, 0), f"meta.bytes.{d}", 0) for d in ("up", "down")}
        return cls(round=as_int(meta["round"], "meta.round", 0), edge=as_str(meta["edge"], "meta.edge"),
                   mode=as_mode(meta["mode"], "meta.mode"), num_samples=as_int(meta["num_samples"], "meta.num_samples", 0),
                   metrics=metrics, missing=missing,
                   adapters=AdapterBundle.from_tensors(msg.tensors, (Tier.USER, Tier.EDGE)), bytes=counted)


def ack(kind: str = "ok", **meta: Any) -> Message:
    """A small acknowledgement (``ok`` from the edge and cloud, ``accepted`` from a user's start)."""
    return Message(kind=kind, meta=meta)
