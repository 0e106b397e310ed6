"""The one step pipeline of the serving tiers: retries answered from the cache, stale and mismatched steps refused."""

from __future__ import annotations

import pytest
import torch

from plans import make_plan
from shared.config.deployment import ModelSpec
from shared.errors import InvalidInput, NotFound
from shared.model.adapters import initial_state
from shared.protocol.enums import Hop, Mode
from shared.protocol.messages import StepRequest, TrainReply
from shared.runtime.steps import Downstream, check_step, serve_step
from shared.runtime.tier import StepLimits, TierRuntime

WIDTH = 32


@pytest.fixture()
def edge(tiny) -> TierRuntime:
    runtime = TierRuntime("edge", tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"))
    runtime.open_session(make_plan(round_id=1, user_id="u"), initial_state(runtime.slots.shapes(), 0))
    return runtime


def request(step: int, mode: Mode = Mode.TRAIN, tokens: int = 3) -> StepRequest:
    mask = torch.zeros(2, 2, dtype=torch.uint8)
    mask.view(-1)[:tokens] = 1
    return StepRequest(1, "u", step, mode, torch.randn(tokens, WIDTH), mask, torch.zeros(2, 2, dtype=torch.int64))


def loss_downstream(calls: list[int]):
    def next_stage(session, req, out):
        calls.append(req.step)
        return Downstream(output=out.square().sum(), loss=1.5)
    return next_stage


def test_a_training_step_returns_the_gradient_of_its_activations(edge) -> None:
    calls: list[int] = []
    req = request(0)
    reply = TrainReply.from_message(serve_step(edge, req.to_message(), loss_downstream(calls), Hop.USER_EDGE))
    assert reply.loss == 1.5 and list(reply.grad.shape) == list(req.hidden.shape) and calls == [0]
    assert edge.session(1, "u").steps == 1


def test_a_retry_gets_the_cached_reply_and_runs_nothing(edge) -> None:
    calls: list[int] = []
    msg = request(0).to_message()
    first = serve_step(edge, msg, loss_downstream(calls), Hop.USER_EDGE)
    again = serve_step(edge, msg, loss_downstream(calls), Hop.USER_EDGE)
    assert again is first and calls == [0] and edge.session(1, "u").steps == 1


def test_only_the_next_step_is_served_and_unknown_sessions_and_other_modes_are_refused(edge) -> None:
    calls: list[int] = []
    with pytest.raises(InvalidInput, match="skips ahead: the next step is 0"):
        serve_step(edge, request(3).to_message(), loss_downstream(calls), Hop.USER_EDGE)
    for step in (0, 1):
        serve_step(edge, request(step).to_message(), loss_downstream(calls), Hop.USER_EDGE)
    with pytest.raises(InvalidInput, match="older than the last step served"):
        serve_step(edge, request(0).to_message(), loss_downstream(calls), Hop.USER_EDGE)
    with pytest.raises(InvalidInput, match="skips ahead: the next step is 2"):
        serve_step(edge, request(100000).to_message(), loss_downstream(calls), Hop.USER_EDGE)
    with pytest.raises(InvalidInput, match="does not match the session"):
        serve_step(edge, request(2, Mode.EVAL).to_message(), loss_downstream(calls), Hop.USER_EDGE)
    other = request(2)
    other.user = "someone-else"
    with pytest.raises(NotFound, match="no session"):
        serve_step(edge, other.to_message(), loss_downstream(calls), Hop.USER_EDGE)
    assert calls == [0, 1]


@pytest.mark.parametrize("change, reason", [
    (lambda r: setattr(r, "hidden", torch.randn(4, WIDTH)), "hidden must be a float tensor of the mask's 3 tokens"),
    (lambda r: setattr(r, "hidden", torch.randn(3, WIDTH + 1)), "x 32"),
    (lambda r: setattr(r, "attention_mask", r.attention_mask * 2), "0s and 1s"),
    (lambda r: setattr(r, "labels", torch.zeros(2, 2)), "labels must be integers"),
    (lambda r: r.hidden.__setitem__((0, 0), float("nan")), "NaN or Inf"),
    (lambda r: setattr(r, "hidden", r.hidden.double()), "hidden must be float32"),
    (lambda r: r.labels.__setitem__((0, 0), 260), r"labels must lie in \[0, 260\) or be -100"),
    (lambda r: r.labels.__setitem__((0, 0), -5), "labels must lie in"),
])
def test_check_step_refuses_tensors_that_cannot_belong_here(change, reason: str) -> None:
    req = request(0)
    change(req)
    with pytest.raises(InvalidInput, match=reason):
        check_step(req, StepLimits(WIDTH, "lm", 260))


def test_classification_labels_must_be_below_the_number_of_classes() -> None:
    req = request(0)
    req.labels = torch.tensor([0, 3])
    with pytest.raises(InvalidInput, match=r"labels must lie in \[0, 3\)$"):
        check_step(req, StepLimits(WIDTH, "cls", 3))
    req.labels = torch.tensor([0, 2])
    check_step(req, StepLimits(WIDTH, "cls", 3))


def test_labels_are_required_in_the_ordinary_chain_and_refused_in_the_u_shaped_one() -> None:
    with_labels, without = request(0), request(0)
    without.labels = None
    with pytest.raises(InvalidInput, match="carries labels"):
        check_step(without, StepLimits(WIDTH, "lm", 260))
    with pytest.raises(InvalidInput, match="U-shaped: labels stay on the device"):
        check_step(with_labels, StepLimits(WIDTH, "lm", 260, labels=False))
    check_step(without, StepLimits(WIDTH, "lm", 260, labels=False))
