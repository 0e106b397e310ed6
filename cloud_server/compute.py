"""The cloud tier's step: last blocks, final norm and head, the loss, and the backward that starts the chain."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.data.batching import IGNORE_INDEX
from shared.errors import InvalidInput
from shared.protocol.enums import Hop
from shared.protocol.messages import EvalReply, StepRequest
from shared.protocol.wire import Message
from shared.runtime.session import Session
from shared.runtime.steps import Downstream, serve_step
from shared.runtime.tier import TierRuntime


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (shifted, padding ignored) or classification cross-entropy."""
    if task == "lm":
        logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
        labels = labels[:, 1:].reshape(-1)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def eval_counts(task: str, logits: torch.Tensor, labels: torch.Tensor) -> EvalReply:
    """Loss sum, the count it is over (tokens or examples), and correct predictions."""
    loss_sum = float(task_loss(task, logits, labels, reduction="sum"))
    if task == "lm":
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        pred = logits[:, :-1, :].argmax(-1)
        return EvalReply(loss_sum=loss_sum, count=int(valid.sum()), correct=int(((pred == target) & valid).sum()))
    return EvalReply(loss_sum=loss_sum, count=int(labels.numel()), correct=int((logits.argmax(-1) == labels).sum()))


class CloudCompute:
    """The cloud partition's handler for steps (rounds live in ``rounds.py``)."""

    def __init__(self, runtime: TierRuntime) -> None:
        self.runtime = runtime

    def on_step(self, msg: Message) -> Message:
        return serve_step(self.runtime, msg, self.head_and_loss, Hop.EDGE_CLOUD)

    def head_and_loss(self, session: Session, request: StepRequest, out: torch.Tensor) -> Downstream:
        """The cloud's next stage: the head; the held-out counts in evaluation, the loss in training."""
        task = self.runtime.spec.task
        labels = request.labels.to(self.runtime.device, torch.int64)
        logits = self.runtime.head(session, out, request.attention_mask)
        if not session.plan.training:
            return Downstream(reply=eval_counts(task, logits.detach(), labels).to_message())
        loss = task_loss(task, logits, labels)
        if not torch.isfinite(loss):
            raise InvalidInput(f"the loss of round {request.round}, user '{request.user}', step {request.step} is not finite")
        return Downstream(output=loss, loss=float(loss.detach()))
