"""The task's loss and held-out counts, wherever the head runs (the cloud, or the user in a U-shaped chain)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.data.batching import IGNORE_INDEX
from shared.protocol.messages import EvalReply


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
