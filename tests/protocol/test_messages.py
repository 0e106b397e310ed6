"""Typed messages: each builds the envelope the README documents, and parsing refuses what it cannot be."""

from __future__ import annotations

import pytest
import torch

from plans import make_plan
from shared.errors import InvalidInput
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Mode, Tier
from shared.protocol.messages import EvalReply, Report, RoundPlan, StepRequest, TrainReply, Update, ack
from shared.protocol.starts import RoundStart, UserStart
from shared.protocol.wire import Message, decode, encode


def over_the_wire(msg: Message) -> Message:
    return decode(encode(msg))


def step() -> StepRequest:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.uint8)
    return StepRequest(3, "user-1", 5, Mode.TRAIN, torch.randn(3, 4), mask, torch.tensor([1, 0]))


def test_step_request_is_the_documented_envelope_and_round_trips() -> None:
    msg = over_the_wire(step().to_message("fp16"))
    assert msg.kind == "step"
    assert list(msg.meta) == ["round", "user", "step", "mode"]
    assert msg.meta == {"round": 3, "user": "user-1", "step": 5, "mode": "train"}
    parsed = StepRequest.from_message(msg)
    assert (parsed.round, parsed.user, parsed.step, parsed.mode) == (3, "user-1", 5, Mode.TRAIN)
    assert set(msg.tensors) == {"hidden", "attention_mask", "labels"}


@pytest.mark.parametrize("meta, reason", [
    ({"round": 3, "user": "u", "step": 5}, "lacks meta.mode"),
    ({"round": 3, "user": "u", "step": 5, "mode": "bogus"}, "mode must be one of train, eval"),
    ({"round": "3", "user": "u", "step": 5, "mode": "train"}, "meta.round must be an integer"),
    ({"round": 3, "user": "u", "step": True, "mode": "train"}, "meta.step must be an integer"),
    ({"round": 3, "user": "", "step": 5, "mode": "train"}, "meta.user must be a non-empty string"),
    ({"round": 3, "user": "u", "step": 5, "mode": "train", "extra": 1}, "unknown field(s) meta.extra"),
])
def test_step_request_refuses_bad_meta(meta: dict, reason: str) -> None:
    msg = step().to_message()
    with pytest.raises(InvalidInput, match=reason.replace("(", r"\(").replace(")", r"\)")):
        StepRequest.from_message(Message("step", meta, msg.tensors))


def test_step_request_refuses_missing_and_unknown_tensors() -> None:
    msg = step().to_message()
    with pytest.raises(InvalidInput, match="lacks tensors.attention_mask"):
        StepRequest.from_message(Message("step", msg.meta, {k: v for k, v in msg.tensors.items() if k != "attention_mask"}))
    no_labels = StepRequest.from_message(Message("step", msg.meta, {k: v for k, v in msg.tensors.items() if k != "labels"}))
    assert no_labels.labels is None  # a U-shaped deployment's step; whether it may lack them is the tier's check
    with pytest.raises(InvalidInput, match="unknown tensor"):
        StepRequest.from_message(Message("step", msg.meta, {**msg.tensors, "pickle": torch.zeros(1)}))


def test_replies_round_trip() -> None:
    train = TrainReply.from_message(over_the_wire(TrainReply(0.5, torch.ones(3, 4)).to_message()))
    assert train.loss == 0.5 and torch.equal(train.grad, torch.ones(3, 4))
    assert over_the_wire(TrainReply(0.5, torch.ones(1)).to_message()).kind == "grad"
    counts = EvalReply.from_message(over_the_wire(EvalReply(2.5, 7, 3).to_message()))
    assert (counts.loss_sum, counts.count, counts.correct) == (2.5, 7, 3)
    with pytest.raises(InvalidInput, match="finite number"):
        EvalReply.from_message(Message("eval", {"loss_sum": float("nan"), "count": 1, "correct": 0}))


def test_round_plan_round_trips_and_refuses_bad_fields() -> None:
    plan = make_plan(round_id=4, user_id="user-2", extra={"ratio": 0.2}, mode="eval")
    assert RoundPlan.from_meta(plan.to_meta()) == plan
    assert plan.to_meta()["mode"] == "eval" and not plan.training
    assert list(plan.to_meta())[:5] == ["round_id", "user_id", "local_steps", "batch_size", "lr"]
    with pytest.raises(InvalidInput, match="plan.local_steps must be an integer >= 1"):
        RoundPlan.from_meta({**plan.to_meta(), "local_steps": 0})
    with pytest.raises(InvalidInput, match="unknown field"):
        RoundPlan.from_meta({**plan.to_meta(), "code": "import os"})
    with pytest.raises(InvalidInput, match="lacks meta.lr"):
        RoundPlan.from_meta({k: v for k, v in plan.to_meta().items() if k != "lr"})


def test_starts_carry_plans_and_prefixed_adapters() -> None:
    adapters = AdapterBundle({Tier.USER: {"a": torch.ones(2)}, Tier.EDGE: {"b": torch.zeros(2)}})
    msg = over_the_wire(RoundStart([make_plan(user_id="u1"), make_plan(user_id="u2")], adapters, 600.0).to_message())
    assert msg.kind == "start" and set(msg.tensors) == {"user/a", "edge/b"}
    start = RoundStart.from_message(msg)
    assert [p.user_id for p in start.plans] == ["u1", "u2"] and start.deadline == 600.0 and start.clip_norm is None
    assert torch.equal(start.adapters[Tier.USER]["a"], torch.ones(2))
    mixed = RoundStart([make_plan(round_id=1), make_plan(round_id=2)], adapters).to_message()
    with pytest.raises(InvalidInput, match="share the round"):
        RoundStart.from_message(mixed)
    user = UserStart.from_message(over_the_wire(UserStart(make_plan(), {"a": torch.ones(2)}).to_message()))
    assert set(user.adapters) == {"a"}
    with pytest.raises(InvalidInput, match="not an adapter of this message"):  # a user gets user adapters only
        UserStart.from_message(Message("start", {"plan": make_plan().to_meta()}, {"edge/b": torch.zeros(1)}))


def test_update_report_and_failure_notice() -> None:
    update = Update(2, "u", Mode.TRAIN, 10, {"train_loss": 1.0}, {"k": torch.ones(1)})
    msg = over_the_wire(update.to_message())
    assert list(msg.meta) == ["round", "user", "mode", "num_samples", "metrics"] and set(msg.tensors) == {"user/k"}
    assert Update.from_message(msg).error is None
    failed = Update.from_message(over_the_wire(Update.failure(2, "u", Mode.TRAIN, "RuntimeError: x").to_message()))
    assert failed.error == "RuntimeError: x" and failed.num_samples == 0
    report = Report(2, "edge-0", Mode.EVAL, 5, {"u": {"loss_sum": 1.0}}, ["v"], bytes={"up": 3, "down": 4})
    parsed = Report.from_message(over_the_wire(report.to_message()))
    assert (parsed.edge, parsed.missing, parsed.bytes) == ("edge-0", ["v"], {"up": 3, "down": 4})
    with pytest.raises(InvalidInput, match="missing must be a list"):
        Report.from_message(Message("update", {**report.to_message().meta, "missing": "v"}))


def test_ack_is_a_small_envelope() -> None:
    assert over_the_wire(ack("accepted", round=1, user="u")).meta == {"round": 1, "user": "u"}
