"""A language model's loss with its logits made a chunk of positions at a time (``shared.runtime.loss``): the same
loss, gradients and held-out counts as the whole batch's logits, and the same step on a tier."""

from __future__ import annotations

import pytest
import torch
from plans import make_plan
from torch import nn

import shared.runtime.loss as loss_module
from shared.config.deployment import ModelSpec
from shared.data.batching import IGNORE_INDEX
from shared.model.adapters import initial_state
from shared.model.families import softcap
from shared.model.partition import HeadParts
from shared.runtime.loss import eval_counts, head_counts, head_loss, step_loss
from shared.runtime.tier import TierRuntime


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 5 positions (of a 11-token vocabulary), so that every batch here spans several and a partial one."""
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", 4 * 11 * 5)


class Softcapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(6, 11)  # trainable, with a bias: as an adapter on the projection would be
        self.config = type("Config", (), {"final_logit_softcapping": 3.0})()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return softcap(self.project(rows), self.config)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.manual_seed(seed)
    hidden = torch.randn(3, 9, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[0, 5:] = IGNORE_INDEX  # padding
    labels[2, 1] = IGNORE_INDEX
    return hidden, labels, torch.randn(6, 6, generator=g)


@pytest.mark.parametrize("count", [None, 40])
def test_chunked_loss_and_gradients_equal_the_whole_batch(small_chunks: None, count: int | None) -> None:
    head = Softcapped()
    results = []
    for chunked in (False, True):
        hidden, labels, mix = batch()
        features = torch.tanh(hidden @ mix)  # something upstream, for the gradient to flow through
        head.zero_grad()
        if chunked:
            loss = head_loss("lm", HeadParts(features, head, tuple(head.parameters()), 11), labels, count)
        else:
            loss = step_loss("lm", head(features), labels, count)
        loss.backward()
        results.append((loss.detach(), hidden.grad, [p.grad.clone() for p in head.parameters()]))
    (whole, grad, params), (chunked, grad_c, params_c) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad, rtol=1e-5, atol=1e-7)
    for p, q in zip(params_c, params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_chunked_loss_of_frozen_rows_and_projection_needs_no_gradient(small_chunks: None) -> None:
    head = Softcapped().requires_grad_(False)
    hidden, labels, _ = batch()
    with torch.no_grad():
        loss = head_loss("lm", HeadParts(hidden, head, (), 11), labels)
    torch.testing.assert_close(loss, step_loss("lm", head(hidden), labels), rtol=1e-6, atol=1e-7)
    assert not loss.requires_grad


def test_a_batch_without_targets_has_a_nan_mean_as_before(small_chunks: None) -> None:
    head = Softcapped()
    hidden, _, _ = batch()
    labels = torch.full((3, 9), IGNORE_INDEX)
    assert step_loss("lm", head(hidden), labels).isnan()
    assert head_loss("lm", HeadParts(hidden, head, tuple(head.parameters()), 11), labels).isnan()


def test_chunked_held_out_counts_equal_the_whole_batch(small_chunks: None) -> None:
    head = Softcapped()
    hidden, labels, _ = batch(3)
    with torch.no_grad():
        whole = eval_counts("lm", head(hidden), labels)
        chunked = head_counts("lm", HeadParts(hidden, head, (), 11), labels)
    assert (chunked.count, chunked.correct) == (whole.count, whole.correct)
    assert chunked.loss_sum == pytest.approx(whole.loss_sum, rel=1e-6)


def cloud_step(tiny, chunked: bool) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """A training step's loss and gradients through the cloud's blocks and head (tiny-llama: its tied head)."""
    runtime = TierRuntime("cloud", tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"))
    session = runtime.open_session(make_plan(round_id=1, user_id="u"), initial_state(runtime.slots.shapes(), 0))
    for p in session.params.values():  # B = 0 at the start: give every adapter a part in the output
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 24, runtime.width, generator=g).requires_grad_(True)
    mask = torch.ones(2, 24, dtype=torch.int64)
    mask[1, 20:] = 0
    labels = torch.randint(0, runtime.step_limits(session).classes, (2, 24), generator=g).masked_fill(mask == 0, IGNORE_INDEX)
    out = runtime.forward(session, hidden, mask, 0)
    if chunked:
        loss = runtime.head(session, out, mask, lambda head: head_loss("lm", head, labels))
    else:
        loss = step_loss("lm", runtime.head(session, out, mask), labels)
    runtime.backward(session, [loss], [None])
    return float(loss.detach()), hidden.grad, {k: p.grad for k, p in session.params.items()}


def test_a_cloud_step_with_chunked_logits_equals_the_whole_batch(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", 4 * 256 * 7)  # 7 positions a chunk of a 256-token vocabulary
    loss, grad, grads = cloud_step(tiny, False)
    loss_c, grad_c, grads_c = cloud_step(tiny, True)
    assert loss_c == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(grad_c, grad, rtol=1e-5, atol=1e-7)
    assert grads_c.keys() == grads.keys()
    for key, g in grads.items():
        torch.testing.assert_close(grads_c[key], g, rtol=1e-5, atol=1e-7, msg=key)


def test_a_frozen_projection_runs_outside_the_tier_lock_a_trainable_one_inside(tiny) -> None:
    """A language model's frozen projection (its usual head) takes its tensors while the session's are bound, so its
    chunks run after the lock is released, beside other sessions' forwards; a projection that trains stays inside."""
    runtime = TierRuntime("cloud", tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"))
    session = runtime.open_session(make_plan(round_id=1, user_id="u"), initial_state(runtime.slots.shapes(), 0))
    hidden = torch.randn(2, 8, runtime.width, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.int64)
    labels = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))

    def lock_free(parts: HeadParts) -> tuple[bool, torch.Tensor]:
        """Whether another session's forward could take the tier's one copy of its blocks while ``then`` runs (it
        waits while the copy is held), and the loss."""
        return runtime.copies.idle() == 1, head_loss("lm", parts, labels)

    free, loss = runtime.head(session, runtime.forward(session, hidden, mask, 0), mask, lock_free)
    assert free and loss.isfinite()
    projection = runtime.variant(session.plan).head.head["lm_head"]
    projection.weight.requires_grad_(True)  # as an adapter on it, or a plug-in training it, would make it
    free, _ = runtime.head(session, runtime.forward(session, hidden, mask, 0), mask, lock_free)
    assert not free
