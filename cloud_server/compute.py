"""The cloud tier's step: last blocks, final norm and head, the loss, and the backward that starts the chain."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.data.batching import IGNORE_INDEX
from shared.runtime.session import Session
from shared.runtime.tier import TierRuntime
from shared.runtime.steps import pack_tokens, unpack_tokens
from shared.protocol.wire import Message


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (shifted, padding ignored) or classification cross-entropy."""
    if task == "lm":
        logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
        labels = labels[:, 1:].reshape(-1)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def eval_counts(task: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """Loss sum, the count it is over (tokens or examples), and correct predictions."""
    loss_sum = float(task_loss(task, logits, labels, reduction="sum"))
    if task == "lm":
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        pred = logits[:, :-1, :].argmax(-1)
        return {"loss_sum": loss_sum, "count": int(valid.sum()), "correct": int(((pred == target) & valid).sum())}
    return {"loss_sum": loss_sum, "count": int(labels.numel()), "correct": int((logits.argmax(-1) == labels).sum())}


class CloudCompute:
    """The cloud partition's handler for forward steps (rounds live in ``rounds.py``)."""

    def __init__(self, runtime: TierRuntime) -> None:
        self.runtime = runtime

    def on_step(self, msg: Message) -> Message:
        session = self.runtime.session(msg.meta["round"], msg.meta["user"])
        with session.step_lock:  # a retry arriving while the first attempt runs waits, then gets its reply
            return self._step(session, msg)

    def _step(self, session: Session, msg: Message) -> Message:
        round_id, user_id, step = msg.meta["round"], msg.meta["user"], msg.meta["step"]
        cached = session.replay(step)
        if cached is not None:
            return cached
        train = session.plan.mode == "train"
        self.runtime.check_step(msg.tensors["hidden"], msg.tensors["attention_mask"], msg.tensors["labels"])
        device = self.runtime.device
        mask = msg.tensors["attention_mask"]
        hidden_in = unpack_tokens(msg.tensors["hidden"].to(device), mask).requires_grad_(train)
        labels = msg.tensors["labels"].to(device, torch.int64)
        out = self.runtime.forward(session, hidden_in, mask, step)
        logits = self.runtime.head(session, out, mask)
        if not train:
            return session.remember(step, Message(kind="eval", meta=eval_counts(self.runtime.spec.task, logits.detach(), labels)))
        loss = task_loss(self.runtime.spec.task, logits, labels)
        if not torch.isfinite(loss):
            raise ValueError(f"the loss of round {round_id}, user '{user_id}', step {step} is not finite")
        self.runtime.backward_and_step(session, [loss], [None])
        grad = hidden_in.grad if hidden_in.grad is not None else torch.zeros_like(hidden_in)
        grad, codecs = self.runtime.outgoing_grad(session, pack_tokens(grad, mask), "edge_cloud")
        return session.remember(step, Message(kind="grad", meta={"loss": float(loss.detach())}, tensors={"grad": grad},
                                              codecs=codecs))
