"""Typed messages between tiers: round plans, step request and reply, update, report (a round's starts:
``shared.protocol.starts``).

Each type knows its ``kind``, its ``meta`` fields and its tensors, builds the envelope that
``shared.protocol.wire`` encodes, and parses a decoded envelope, refusing (422, ``InvalidInput``)
one that lacks a field, carries an unknown one or a value of the wrong type. The envelope's ``v``
versions these schemas together with the envelope: v1 is what this module reads and writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from shared.errors import InvalidInput
from shared.protocol.bundle import AdapterBundle, AdapterState
from shared.protocol.enums import Mode, Tier
from shared.protocol.fields import (Json, as_int, as_map, as_micro, as_mode, as_number, as_str, check_fields,
                                    tensors_of)
from shared.protocol.wire import Message


# -- round plans ----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RoundPlan:
    """What one participant does in one round; travels as msgpack metadata, never as code.

    Made by the coordinator from the round's configuration (``shared.config.round.RoundConfig``),
    which declares the defaults: a plan has none of its own for the round's settings."""

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
    # the participant's placement, as the cloud assigned it at registration (None: the deployment's defaults)
    data: str | None = None  # the task (data set) it trains, where its model serves several
    cut: int | None = None  # its own cut a_u: the device runs blocks [0, a_u), the edge [a_u, b)
    rank: int | None = None  # its LoRA rank (<= the deployment's): tensors truncated on download, zero-padded on upload
    micro_batches: int = 1  # a step's batch goes through the tiers as this many micro-batches (a pipeline)

    PLACEMENT: ClassVar[tuple[str, ...]] = ("data", "cut", "rank")

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)

    @property
    def training(self) -> bool:
        return self.mode is Mode.TRAIN

    def to_meta(self) -> Json:
        meta = dataclasses.asdict(self)
        meta["mode"] = self.mode.value
        for name in self.PLACEMENT:  # sent only where set: a default placement costs no bytes
            if meta[name] is None:
                del meta[name]
        if self.micro_batches == 1:  # the default stays off the wire: a plan without pipelining is as before
            del meta["micro_batches"]
        return meta

    @classmethod
    def from_meta(cls, meta: Any) -> "RoundPlan":
        meta = as_map(meta, "a round plan")
        names = tuple(f.name for f in dataclasses.fields(cls))
        check_fields("round plan", meta, names[:5], names[5:])
        placement = {name: meta.get(name) for name in cls.PLACEMENT}
        if placement["data"] is not None:
            as_str(placement["data"], "plan.data")
        for name in ("cut", "rank"):
            if placement[name] is not None:
                as_int(placement[name], f"plan.{name}", 0 if name == "cut" else 1)
        plan = cls(**placement,
            round_id=as_int(meta["round_id"], "plan.round_id", 0), user_id=as_str(meta["user_id"], "plan.user_id"),
            local_steps=as_int(meta["local_steps"], "plan.local_steps", 1),
            batch_size=as_int(meta["batch_size"], "plan.batch_size", 1), lr=as_number(meta["lr"], "plan.lr"),
            seed=as_int(meta.get("seed", 0), "plan.seed"), algorithm=as_str(meta.get("algorithm", "fedavg"), "plan.algorithm"),
            config=as_map(meta.get("config", {}), "plan.config"), extra=as_map(meta.get("extra", {}), "plan.extra"),
            mode=as_mode(meta.get("mode", "train"), "plan.mode"),
            micro_batches=as_int(meta.get("micro_batches", 1), "plan.micro_batches", 1))
        if plan.micro_batches > plan.batch_size:
            raise InvalidInput(f"plan.micro_batches ({plan.micro_batches}) must not exceed plan.batch_size ({plan.batch_size})")
        return plan


# -- steps ------------------------------------------------------------------------------------------------------


def micro_meta(micro: tuple[int, int]) -> Json:
    """A micro-batch's place in its step, on the wire only when the step is split (one micro-batch: as before)."""
    return {"micro": list(micro)} if micro[1] > 1 else {}


@dataclass
class StepRequest:
    """One step's activations across a cut: real-token rows ``hidden`` (tokens x width), the mask, the labels
    (none in a U-shaped chain: the labels stay on the device).

    A step split into micro-batches sends one request per micro-batch: ``micro`` is (index, count), and
    ``label_count`` the labelled targets of the whole step, which the loss of each micro-batch is divided
    by so that the micro-batches' gradients add up to the whole batch's."""

    KIND: ClassVar[str] = "step"
    round: int
    user: str
    step: int
    mode: Mode
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    micro: tuple[int, int] = (0, 1)
    label_count: int | None = None

    def to_message(self, hidden_codec: Any = None) -> Message:
        tensors = {"hidden": self.hidden, "attention_mask": self.attention_mask}
        if self.labels is not None:
            tensors["labels"] = self.labels
        meta = {"round": self.round, "user": self.user, "step": self.step, "mode": Mode(self.mode).value,
                **micro_meta(self.micro)}
        if self.label_count is not None:
            meta["label_count"] = self.label_count
        return Message(kind=self.KIND, meta=meta, tensors=tensors, codecs={"hidden": hidden_codec} if hidden_codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "StepRequest":
        meta = msg.meta
        check_fields("step", meta, ("round", "user", "step", "mode"), ("micro", "label_count"))
        names = ("hidden", "attention_mask", "labels") if "labels" in msg.tensors else ("hidden", "attention_mask")
        hidden, mask, *labels = tensors_of("step", msg, names)
        label_count = meta.get("label_count")
        if label_count is not None and not labels:
            raise InvalidInput("meta.label_count comes with labels only")
        return cls(round=as_int(meta["round"], "meta.round", 0), user=as_str(meta["user"], "meta.user"),
                   step=as_int(meta["step"], "meta.step", 0), mode=as_mode(meta["mode"], "meta.mode"),
                   hidden=hidden, attention_mask=mask, labels=labels[0] if labels else None,
                   micro=as_micro(meta.get("micro", [0, 1]), "meta.micro"),
                   label_count=None if label_count is None else as_int(label_count, "meta.label_count", 1))


@dataclass
class OutputReply:
    """U-shaped chain: the reply to a step is the last block's output rows (tokens x width), for the user's head."""

    KIND: ClassVar[str] = "output"
    hidden: torch.Tensor

    def to_message(self, codec: Any = None) -> Message:
        return Message(kind=self.KIND, tensors={"hidden": self.hidden}, codecs={"hidden": codec} if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "OutputReply":
        check_fields("output", msg.meta, ())
        (hidden,) = tensors_of("output", msg, ("hidden",))
        return cls(hidden)


@dataclass
class BackwardRequest:
    """U-shaped chain: the gradient of a step's output (``grad``, like the output rows) going back, with the loss.
    The reply is the gradient of that step's input (a ``TrainReply``). ``micro`` as in ``StepRequest``."""

    KIND: ClassVar[str] = "backward"
    round: int
    user: str
    step: int
    loss: float
    grad: torch.Tensor
    micro: tuple[int, int] = (0, 1)

    def to_message(self, codec: Any = None) -> Message:
        return Message(kind=self.KIND, meta={"round": self.round, "user": self.user, "step": self.step,
                                             "loss": self.loss, **micro_meta(self.micro)},
                       tensors={"grad": self.grad}, codecs={"grad": codec} if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "BackwardRequest":
        meta = msg.meta
        check_fields("backward", meta, ("round", "user", "step", "loss"), ("micro",))
        (grad,) = tensors_of("backward", msg, ("grad",))
        return cls(round=as_int(meta["round"], "meta.round", 0), user=as_str(meta["user"], "meta.user"),
                   step=as_int(meta["step"], "meta.step", 0), loss=as_number(meta["loss"], "meta.loss"), grad=grad,
                   micro=as_micro(meta.get("micro", [0, 1]), "meta.micro"))


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
        check_fields("step reply", msg.meta, ("loss",))
        (grad,) = tensors_of("step reply", msg, ("grad",))
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
        check_fields("eval reply", msg.meta, ("loss_sum", "count", "correct"))
        tensors_of("eval reply", msg, ())
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
        check_fields("update", meta, ("round", "user", "mode", "num_samples", "metrics"))
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
    reasons: dict[str, str] = field(default_factory=dict)  # why each missing user was dropped
    clipped: Json = field(default_factory=dict)  # tier -> {"bound", "sources"}: the users whose updates the edge clipped
    adapters: AdapterBundle = field(default_factory=AdapterBundle)
    bytes: dict[str, int] | None = None  # the user-edge hop's bytes for this (round, mode), where measured

    def to_message(self, codec: Any = None) -> Message:
        tensors = self.adapters.tensors()
        meta: Json = {"round": self.round, "edge": self.edge, "mode": Mode(self.mode).value,
                      "num_samples": self.num_samples, "metrics": self.metrics, "missing": list(self.missing)}
        if self.reasons:
            meta["reasons"] = dict(self.reasons)
        if self.clipped:
            meta["clipped"] = dict(self.clipped)
        if self.bytes is not None:
            meta["bytes"] = dict(self.bytes)
        return Message(kind=self.KIND, meta=meta, tensors=tensors, codecs=dict.fromkeys(tensors, codec) if codec else {})

    @classmethod
    def from_message(cls, msg: Message) -> "Report":
        meta = msg.meta
        check_fields("report", meta, ("round", "edge", "mode", "num_samples", "metrics", "missing"), ("reasons", "clipped", "bytes"))
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
                   metrics=metrics, missing=missing, clipped=as_map(meta.get("clipped", {}), "meta.clipped"),
                   reasons={as_str(u, "meta.reasons"): str(r)[:300] for u, r in as_map(meta.get("reasons", {}),
                                                                                      "meta.reasons").items()},
                   adapters=AdapterBundle.from_tensors(msg.tensors, (Tier.USER, Tier.EDGE)), bytes=counted)


def ack(kind: str = "ok", **meta: Any) -> Message:
    """A small acknowledgement (``ok`` from the edge and cloud, ``accepted`` from a user's start)."""
    return Message(kind=kind, meta=meta)
