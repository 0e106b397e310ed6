"""One (round, user) replica on one tier: adapters, optimizer, plug-in, and the last reply for retries."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.errors import InvalidInput
from shared.fl.plugin import SessionPlugin
from shared.protocol.codecs import ErrorFeedback
from shared.protocol.fields import as_int, as_number
from shared.protocol.messages import EvalReply, RoundPlan


@dataclass
class OptimizerSettings:
    """AdamW per tier and session (the same elementwise update as one optimizer over the whole model)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def make(self, params: dict[str, nn.Parameter], lr: float, scales: dict[str, float],
             kind_of: Callable[[str], str]) -> torch.optim.Optimizer | None:
        """AdamW over ``params``: one group per learning rate, ``lr`` times the scale of each tensor's kind."""
        if not params:
            return None
        groups: dict[float, list[nn.Parameter]] = {}
        for key, param in params.items():
            groups.setdefault(lr * float(scales.get(kind_of(key), 1.0)), []).append(param)
        return torch.optim.AdamW([{"params": ps, "lr": g} for g, ps in groups.items()], lr=lr, betas=self.betas,
                                 eps=self.eps, weight_decay=self.weight_decay)


class StepTracker:
    """The steps a serving tier has served for one session, one micro-batch request at a time.

    Steps come one after another, from 0. A step's micro-batches (``count`` of them, 1 when the batch
    is not split) may be served at the same time: that is the pipeline. Each request is ``admit``-ted,
    then ``finish``-ed with its reply (or ``fail``-ed): the request that finishes the step's last
    micro-batch runs the step's update (the optimizer, once the gradients of every micro-batch are in)
    before its reply goes, and only then may the next step begin. Replies are kept for the last step, so
    a retry gets the same reply and runs nothing; a retry that arrives while its first attempt runs
    waits for that reply. ``phase`` tells a U-shaped chain's two requests per micro-batch apart
    (``step``: the forward; ``backward``: the gradient coming back, which finishes the micro-batch).
    """

    def __init__(self, round_id: int, user_id: str) -> None:
        self.where = f"round {round_id}, user '{user_id}'"
        self.cond = threading.Condition()
        self.last_step = -1  # the last step whose every micro-batch is done (and its update made)
        self.open: int | None = None  # the step being served
        self.count = 1  # its micro-batches
        self.done = 0  # its micro-batches finished
        self.running: set[tuple[str, int]] = set()  # (phase, micro) requests under way
        self.replies: dict[tuple[str, int], Any] = {}  # the open step's, else the last step's

    def admit(self, step: int, micro: int, count: int, phase: str = "step") -> Any:
        """The cached reply when this request is a retry; None when it is new and the caller must serve it.
        Any other step than the open one, or the next one when none is open, is refused (422)."""
        key = (phase, micro)
        with self.cond:
            while True:
                current = self.open if self.open is not None else self.last_step
                if step == current and key in self.replies:
                    return self.replies[key]
                if step == current and key in self.running:
                    self.cond.wait()
                    continue
                if step == self.open:
                    if count != self.count:
                        raise InvalidInput(f"step {step} of {self.where} has {self.count} micro-batches, not {count}")
                    break
                if phase != "step":
                    raise InvalidInput(f"no forward of step {step} awaits its backward in {self.where}")
                if step <= self.last_step:
                    raise InvalidInput(f"step {step} of {self.where} is older than the last step served "
                                       f"({self.last_step})")
                if self.open is not None:
                    raise InvalidInput(f"step {step} of {self.where} came while step {self.open} is still served")
                if step != self.last_step + 1:
                    raise InvalidInput(f"step {step} of {self.where} skips ahead: the next step is {self.last_step + 1}")
                self.open, self.count, self.done = step, count, 0
                self.replies.clear()
                break
            self.running.add(key)
            return None

    def finish(self, micro: int, reply: Any, phase: str = "step", completes: bool = True,
               update: Callable[[], None] | None = None) -> Any:
        """Keep a served request's reply; ``completes``: its micro-batch is done. The last one of the step runs
        ``update`` first, then closes the step."""
        key = (phase, micro)
        with self.cond:
            self.done += completes
            last = completes and self.done == self.count
            if not last:
                self.replies[key] = reply
                self.running.discard(key)
                self.cond.notify_all()
                return reply
        try:
            if update is not None:
                update()
        finally:
            with self.cond:
                self.replies[key] = reply
                self.running.discard(key)
                self.last_step, self.open = self.open if self.open is not None else self.last_step, None
                self.cond.notify_all()
        return reply

    def fail(self, micro: int, phase: str = "step") -> None:
        """A request failed: a retry may serve it again."""
        with self.cond:
            self.running.discard((phase, micro))
            self.cond.notify_all()


@dataclass
class HeldOut:
    """What a serving tier saw of one user's evaluation: the tokens it served, and the sums of the ``eval`` replies it
    computed or relayed (a U-shaped chain's user scores itself: then no reply carries sums)."""

    tokens: int = 0
    replies: int = 0
    loss_sum: float = 0.0
    count: int = 0
    correct: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # micro-batches may come at once

    def add(self, tokens: int, counts: EvalReply | None) -> None:
        with self._lock:
            self.tokens += tokens
            if counts is not None:
                self.replies += 1
                self.loss_sum += counts.loss_sum
                self.count += counts.count
                self.correct += counts.correct

    def sums(self, claimed: dict[str, Any], where: str, served: bool) -> dict[str, Any]:
        """The held-out sums to count for a user whose evaluation update ``claimed`` these: this tier's own where eval
        replies passed through it, whatever the update says; else the claimed ones, if they can be (``InvalidInput``
        otherwise): ``loss_sum`` >= 0 and integers ``0 <= correct <= count``, and where the user's steps come through
        this tier (``served``), ``count`` no more than the tokens it served."""
        with self._lock:
            if self.replies:
                return {"loss_sum": self.loss_sum, "count": self.count, "correct": self.correct}
            tokens = self.tokens
        loss_sum = as_number(claimed.get("loss_sum"), f"{where}'s loss_sum")
        count, correct = (as_int(claimed.get(k), f"{where}'s {k}", 0) for k in ("count", "correct"))
        if loss_sum < 0 or correct > count or (served and count > tokens):
            raise InvalidInput(f"{where}'s held-out sums cannot be: loss_sum {loss_sum:.4g} must be >= 0 and correct "
                               f"({correct}) <= count ({count})" + (f" <= the {tokens} tokens evaluated here" if served else ""))
        return {"loss_sum": loss_sum, "count": count, "correct": correct}


@dataclass
class Session:
    """One (round, user) replica on one tier: its adapters, optimizer state, plug-in and counters."""

    plan: RoundPlan
    plugin: SessionPlugin
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # frozen base weights this session runs instead
    steps: int = 0
    samples: int = 0
    compute_seconds: float = 0.0  # this tier's forward, head, backward and optimizer time for the session
    blocks_run: int = 0  # blocks its training forwards ran, summed over steps
    held_out: HeldOut = field(default_factory=HeldOut)  # an evaluation session's tokens and sums (``mode`` eval)
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)  # of top-k compressed gradients this tier sends
    tracker: StepTracker = field(init=False, repr=False)  # the steps served, their replies for retries
    pending: dict[int, Any] = field(default_factory=dict)  # U-shaped chain: forward graphs awaiting their backward

    def __post_init__(self) -> None:
        self.tracker = StepTracker(self.plan.round_id, self.plan.user_id)

    @property
    def round_id(self) -> int:
        return self.plan.round_id

    @property
    def user_id(self) -> str:
        return self.plan.user_id

    @property
    def key(self) -> tuple[int, str]:
        return (self.plan.round_id, self.plan.user_id)

    @property
    def last_step(self) -> int:
        """The last step whose every micro-batch is done (-1 before the first)."""
        return self.tracker.last_step
