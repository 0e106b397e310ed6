"""The task's loss and held-out counts, wherever the head runs (the cloud, or the user in a U-shaped chain).

A language model's logits are made a chunk of positions at a time (``LOGITS_CHUNK_BYTES``), never for the whole
batch: at 8 x 128 positions and a 49,152-token vocabulary they are 201 MB in float32, and the loss and its backward
made three more of that size, every step. glibc's malloc maps allocations that large afresh each time and unmaps them
when freed, so every step paid for about 1.2 GB of new pages (0.29 million page faults a step, the head alone, on
smollm2-135m). A chunk stays under the largest size glibc's mmap threshold rises to (32 MiB on 64-bit machines), so
from the second step on malloc serves the chunks from memory the process already holds. The tiers take a head's loss
and counts through ``head_loss`` and ``head_counts``; ``step_loss`` and ``eval_counts`` take whole logits (a
classifier's, and the whole-batch reference the tests hold the chunks to).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from shared.data.batching import IGNORE_INDEX
from shared.model.partition import HeadParts
from shared.protocol.messages import EvalReply

# a language model's logits (float32) are made at most this many bytes at a time, for at least MIN_CHUNK_ROWS positions
LOGITS_CHUNK_BYTES = 24 << 20
MIN_CHUNK_ROWS = 16


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (shifted, padding ignored) or classification cross-entropy."""
    if task == "lm":
        logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
        labels = labels[:, 1:].reshape(-1)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def label_count(task: str, labels: torch.Tensor) -> int:
    """The targets a batch's mean loss is taken over: examples (classification), or labelled next tokens."""
    if task == "lm":
        return max(1, int((labels[:, 1:] != IGNORE_INDEX).sum()))
    return int(labels.shape[0])


def step_loss(task: str, logits: torch.Tensor, labels: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """A step's training loss: the mean over the batch; for one micro-batch of a step, its share of the step's
    mean (its loss summed, over ``count``, the step's ``label_count``), so the micro-batches' gradients add up
    to the whole batch's."""
    if count is None:
        return task_loss(task, logits, labels)
    return task_loss(task, logits, labels, reduction="sum") / count


def eval_counts(task: str, logits: torch.Tensor, labels: torch.Tensor) -> EvalReply:
    """Loss sum, the count it is over (tokens or examples), and correct predictions."""
    loss_sum = float(task_loss(task, logits, labels, reduction="sum"))
    if task == "lm":
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        pred = logits[:, :-1, :].argmax(-1)
        return EvalReply(loss_sum=loss_sum, count=int(valid.sum()), correct=int(((pred == target) & valid).sum()))
    return EvalReply(loss_sum=loss_sum, count=int(labels.numel()), correct=int((logits.argmax(-1) == labels).sum()))


def head_loss(task: str, parts: HeadParts, labels: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``step_loss`` of the head ``parts`` (``Partition.head_parts``), a language model's logits made a chunk of
    positions at a time: the same loss and gradients, up to the order float32 sums in."""
    if task != "lm":
        return step_loss(task, parts.to_logits(parts.features), labels, count)
    rows, targets = lm_targets(parts.features, labels)
    # 1 / the count, in float32 as cross-entropy's mean takes it: each position's gradient is then the same number,
    # bit for bit, as with the whole batch's logits (a scale applied after the matmul would round differently)
    scale = torch.ones((), dtype=torch.float32, device=rows.device) / (targets.numel() if count is None else count)
    return _ChunkedCrossEntropy.apply(parts.to_logits, _chunk_rows(parts), scale, targets, rows, *parts.params)


def head_counts(task: str, parts: HeadParts, labels: torch.Tensor) -> EvalReply:
    """``eval_counts`` of the head ``parts``, a language model's logits made a chunk of positions at a time."""
    if task != "lm":
        return eval_counts(task, parts.to_logits(parts.features).detach(), labels)
    with torch.no_grad():
        rows, targets = lm_targets(parts.features, labels)
        loss_sum, correct, size = 0.0, 0, _chunk_rows(parts)
        for start in range(0, rows.shape[0], size):
            logits, target = parts.to_logits(rows[start:start + size]), targets[start:start + size]
            loss_sum += float(F.cross_entropy(logits.float(), target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
    return EvalReply(loss_sum=loss_sum, count=int(targets.numel()), correct=correct)


def lm_targets(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions with a next token to predict: their rows of ``features`` (batch, seq, width) and the tokens."""
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    return features[:, :-1][keep], target[keep]


def _chunk_rows(parts: HeadParts) -> int:
    return max(MIN_CHUNK_ROWS, LOGITS_CHUNK_BYTES // (4 * max(1, parts.outputs)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy over ``rows``' logits, summed and multiplied by ``scale``, the logits made and dropped a chunk at
    a time. The forward computes each chunk's gradients at once (of its rows and of the projection's trainable
    tensors), so nothing of the logits outlives its chunk; the backward only multiplies them by the incoming
    gradient (1 where the loss is the step's)."""

    @staticmethod
    def forward(ctx: Any, to_logits: Callable[[torch.Tensor], torch.Tensor], size: int, scale: torch.Tensor,
                targets: torch.Tensor, rows: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        need = ctx.needs_input_grad[4:]
        grads = [torch.zeros_like(t) if n else None for t, n in zip((rows, *params), need)]
        total = torch.zeros((), dtype=torch.float32, device=rows.device) * scale  # no rows: NaN for a mean, as before
        for start in range(0, rows.shape[0], size):
            with torch.enable_grad():
                x = rows[start:start + size].detach().requires_grad_(need[0])
                loss = F.cross_entropy(to_logits(x).float(), targets[start:start + size], reduction="sum") * scale
                wrt = [t for t, n in zip((x, *params), need) if n]
                found = iter(torch.autograd.grad(loss, wrt) if wrt else ())
            if need[0]:
                grads[0][start:start + size] = next(found)
            for grad, n in zip(grads[1:], need[1:]):
                if n:
                    grad += next(found)
            total += loss.detach()
        ctx.grads = grads
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        return (None, None, None, None, *(None if g is None else g * grad_total.to(g.dtype) for g in grads))
