"""The one step pipeline every serving tier runs (edge and cloud), and the packing of activations across a cut.

``serve_step`` takes a step request, finds its session, answers a retry from the cache, checks the
tensors, runs this tier's blocks, hands the output to what lies downstream (the edge relays it to
the cloud; the cloud runs the head and the loss), backpropagates, steps the optimizer and replies
with the gradient of the request's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.data.batching import IGNORE_INDEX
from shared.errors import InvalidInput, UpstreamError
from shared.protocol.enums import Hop
from shared.protocol.messages import BackwardRequest, EvalReply, StepRequest, TrainReply
from shared.protocol.wire import Message
from shared.runtime.loss import label_count
from shared.runtime.session import Session
from shared.runtime.tier import StepLimits, TierRuntime


def pack_tokens(t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, width) -> (tokens, width): only the positions the mask keeps cross a cut.

    Exact: padding positions influence no real position (their keys are masked, their labels
    ignored), so their activations need not travel and their gradients are zero.
    """
    return t[attention_mask.to(t.device, torch.bool)]


def unpack_tokens(rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(tokens, width) -> (batch, seq, width), zeros at padding positions."""
    out = rows.new_zeros((*attention_mask.shape, rows.shape[-1]))
    out[attention_mask.to(rows.device, torch.bool)] = rows
    return out


def check_step(request: StepRequest, limits: StepLimits) -> None:
    """Refuse step tensors that cannot belong to this model (``InvalidInput``: a 422 over HTTP).

    ``hidden`` carries the real tokens only (``pack_tokens``): one row per 1 in the mask, in the tier's
    compute dtype. Labels are class ids below the head's size (language modelling: -100 where ignored).
    """
    hidden, attention_mask, labels = request.hidden, request.attention_mask, request.labels
    width = limits.width
    if (labels is not None) != limits.labels:
        raise InvalidInput("a step of this deployment carries labels" if limits.labels else
                           "this deployment is U-shaped: labels stay on the device, a step must not carry them")
    if attention_mask.dim() != 2 or attention_mask.is_floating_point() or attention_mask.numel() == 0:
        raise InvalidInput(f"attention_mask must be a non-empty integer tensor (batch, seq); got "
                           f"{attention_mask.dtype} {list(attention_mask.shape)}")
    batch, seq = attention_mask.shape
    if limits.rows is not None and batch > limits.rows:
        raise InvalidInput(f"a step of this session holds at most {limits.rows} examples; got {batch}")
    if limits.positions is not None and seq > limits.positions:
        raise InvalidInput(f"a sequence is at most {limits.positions} tokens (the model's positions); got {seq}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise InvalidInput("attention_mask must hold 0s and 1s")
    tokens = int(attention_mask.sum())
    if hidden.dim() != 2 or list(hidden.shape) != [tokens, width] or not hidden.is_floating_point():
        raise InvalidInput(f"hidden must be a float tensor of the mask's {tokens} tokens x {width}; "
                           f"got {hidden.dtype} {list(hidden.shape)}")
    if hidden.dtype != limits.dtype:
        raise InvalidInput(f"hidden must be {str(limits.dtype).removeprefix('torch.')} (this tier computes in it); "
                           f"got {str(hidden.dtype).removeprefix('torch.')}")
    if not torch.isfinite(hidden).all():
        raise InvalidInput("hidden contains NaN or Inf")
    if labels is not None:
        check_labels(labels, attention_mask, limits)
        if request.label_count is not None and request.label_count < label_count(limits.task, labels):
            raise InvalidInput(f"meta.label_count ({request.label_count}) is below this micro-batch's own "
                               f"{label_count(limits.task, labels)} labelled targets")


def check_labels(labels: torch.Tensor, attention_mask: torch.Tensor, limits: StepLimits) -> None:
    """Class ids below the head's size, one per example (classification) or per position (-100: ignored)."""
    task = limits.task
    want = list(attention_mask.shape) if task == "lm" else [attention_mask.shape[0]]
    if list(labels.shape) != want or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InvalidInput(f"labels must be integers of shape {want}; got {labels.dtype} {list(labels.shape)}")
    valid = (labels >= 0) & (labels < limits.classes)
    if task == "lm":
        valid |= labels == IGNORE_INDEX
    if not bool(valid.all()):
        raise InvalidInput(f"labels must lie in [0, {limits.classes})" + (" or be -100" if task == "lm" else ""))


def check_grad(grad: torch.Tensor, like: torch.Tensor, source: str) -> None:
    """A gradient that came back for ``like`` (packed rows): same shape, finite."""
    if list(grad.shape) != list(like.shape) or not grad.is_floating_point() or not torch.isfinite(grad).all():
        raise UpstreamError(f"{source} sent a non-finite or mis-shaped gradient {list(grad.shape)} for "
                            f"{list(like.shape)}")


@dataclass
class Downstream:
    """What lies past this tier's blocks, for one step.

    In evaluation: ``reply`` (sent back as it is). In training: ``output`` to backpropagate from
    (this tier's output, or the loss), its incoming gradient ``grad`` (None for a loss), and the
    step's ``loss`` for the reply. In a U-shaped chain's training: ``reply`` (the last block's output,
    going back now) and ``output``, kept with the step until its backward request brings the gradient.
    """

    reply: Message | None = None
    output: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    loss: float = 0.0
    counts: EvalReply | None = None  # in evaluation, the held-out sums the reply carries (none in a U-shaped chain)


NextStage = Callable[[Session, StepRequest, torch.Tensor], Downstream]
NextBack = Callable[[Session, BackwardRequest, "Pending"], torch.Tensor]  # the gradient of this tier's output rows


@dataclass
class Pending:
    """A U-shaped step's forward graph (one micro-batch's) on a serving tier, waiting for its backward request."""

    hidden_in: torch.Tensor
    out: torch.Tensor
    mask: torch.Tensor


def serve_step(runtime: TierRuntime, msg: Message, next_stage: NextStage, back_hop: Hop) -> Message:
    """One step (or one micro-batch of it) at a serving tier: the request's activations through this tier and back
    (see the module doc). Micro-batches of one step may be served at the same time; the gradients of each add up
    in the adapters' ``grad``, and the optimizer steps once the step's last micro-batch is done."""
    request = StepRequest.from_message(msg)
    session = runtime.session(request.round, request.user)
    if request.mode != session.plan.mode:
        raise InvalidInput(f"step mode '{request.mode}' does not match the session's '{session.plan.mode}'")
    micro, count = request.micro
    if count > session.plan.batch_size:
        raise InvalidInput(f"a step of {session.plan.batch_size} examples has at most as many micro-batches, not {count}")
    tracker = session.tracker
    cached = tracker.admit(request.step, micro, count)
    if cached is not None:
        return cached
    try:
        check_step(request, runtime.step_limits(session))
        train = session.plan.training
        mask = request.attention_mask
        hidden_in = unpack_tokens(request.hidden.to(runtime.device), mask).requires_grad_(train)
        out = runtime.forward(session, hidden_in, mask, request.step)
        result = next_stage(session, request, out)
        if not train:
            session.held_out.add(int(mask.sum()), result.counts)
            return tracker.finish(micro, result.reply)
        if result.reply is not None:  # U-shaped: the gradient of ``out`` comes with the step's backward request
            session.pending[micro] = Pending(hidden_in, result.output, mask)
            return tracker.finish(micro, result.reply, completes=False)
        runtime.backward(session, [result.output], [result.grad])
        reply = TrainReply(loss=result.loss, grad=_input_grad(runtime, session, hidden_in, mask, back_hop, micro))
    except BaseException:
        tracker.fail(micro)
        raise
    return tracker.finish(micro, reply.to_message(_grad_codecs(runtime, back_hop)), update=lambda: runtime.step(session))


def serve_backward(runtime: TierRuntime, msg: Message, next_back: NextBack, back_hop: Hop) -> Message:
    """U-shaped chain: the gradient of a step's output comes back; backpropagate it through this tier's blocks and
    reply with the gradient of the step's input (the optimizer steps once every micro-batch of the step is back).
    A retry gets the same reply."""
    request = BackwardRequest.from_message(msg)
    session = runtime.session(request.round, request.user)
    micro, count = request.micro
    tracker = session.tracker
    cached = tracker.admit(request.step, micro, count, "backward")
    if cached is not None:
        return cached
    try:
        pending: Pending | None = session.pending.get(micro)
        if pending is None:
            raise InvalidInput(f"no forward of step {request.step} awaits its backward in round {request.round}, "
                               f"user '{request.user}'")
        rows = pack_tokens(pending.out, pending.mask)
        if list(request.grad.shape) != list(rows.shape) or request.grad.dtype != rows.dtype \
                or not torch.isfinite(request.grad).all():
            raise InvalidInput(f"grad must be a finite {str(rows.dtype).removeprefix('torch.')} tensor shaped like the "
                               f"step's output rows {list(rows.shape)}; got {request.grad.dtype} {list(request.grad.shape)}")
        grad_out = next_back(session, request, pending)
        runtime.backward(session, [pending.out], [unpack_tokens(grad_out.to(pending.out.device), pending.mask)])
        reply = TrainReply(loss=request.loss, grad=_input_grad(runtime, session, pending.hidden_in, pending.mask,
                                                               back_hop, micro))
        del session.pending[micro]
    except BaseException:
        tracker.fail(micro, "backward")
        raise
    return tracker.finish(micro, reply.to_message(_grad_codecs(runtime, back_hop)), "backward",
                          update=lambda: runtime.step(session))


def _input_grad(runtime: TierRuntime, session: Session, hidden_in: torch.Tensor, mask: torch.Tensor, back_hop: Hop,
                micro: int) -> torch.Tensor:
    """The gradient of a request's input rows, ready to go back over ``back_hop`` (top-k with error feedback
    kept per micro-batch where configured)."""
    grad = hidden_in.grad if hidden_in.grad is not None else torch.zeros_like(hidden_in)
    return runtime.outgoing_grad(session, pack_tokens(grad, mask), back_hop, micro)


def _grad_codecs(runtime: TierRuntime, back_hop: Hop) -> dict[str, str]:
    return {"grad": str(runtime.policy(back_hop).spec("gradients"))}
