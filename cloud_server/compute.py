"""The cloud tier's step: last blocks, final norm and head, the loss, and the backward that starts the chain."""

from __future__ import annotations

import torch

from shared.errors import InvalidInput
from shared.protocol.enums import Hop
from shared.protocol.messages import OutputReply, StepRequest
from shared.runtime.loss import head_counts, head_loss
from shared.protocol.wire import Message
from shared.runtime.session import Session
from shared.runtime.steps import Downstream, pack_tokens, serve_backward, serve_step
from shared.runtime.tier import TierRuntime


class CloudCompute:
    """The cloud partition's handler for steps (rounds live in ``rounds.py``)."""

    def __init__(self, runtime: TierRuntime) -> None:
        self.runtime = runtime

    def on_step(self, msg: Message) -> Message:
        return serve_step(self.runtime, msg, self.head_and_loss, Hop.EDGE_CLOUD)

    def on_backward(self, msg: Message) -> Message:
        """U-shaped chain: the gradient of the last block's output, from the user's loss."""
        return serve_backward(self.runtime, msg, lambda session, request, pending: request.grad, Hop.EDGE_CLOUD)

    def head_and_loss(self, session: Session, request: StepRequest, out: torch.Tensor) -> Downstream:
        """The cloud's next stage: the head; the held-out counts in evaluation, the loss in training. In a
        U-shaped chain the head is the user's: the last block's output rows go back."""
        if self.runtime.spec.u_shaped:
            codec = self.runtime.policy(Hop.EDGE_CLOUD).activations
            reply = OutputReply(pack_tokens(out.detach(), request.attention_mask)).to_message(codec)
            return Downstream(reply=reply, output=out if session.plan.training else None)
        task = self.runtime.variant(session.plan).spec.task
        labels = request.labels.to(self.runtime.device, torch.int64)
        if not session.plan.training:
            counts = self.runtime.head(session, out, request.attention_mask, lambda head: head_counts(task, head, labels))
            return Downstream(reply=counts.to_message(), counts=counts)
        loss = self.runtime.head(session, out, request.attention_mask,
                                 lambda head: head_loss(task, head, labels, request.label_count))
        if not torch.isfinite(loss):
            raise InvalidInput(f"the loss of round {request.round}, user '{request.user}', step {request.step} is not finite")
        return Downstream(output=loss, loss=float(loss.detach()))
