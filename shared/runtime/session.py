"""What every tier runs: its partition with LoRA, per-session replicas and optimizers, the hooks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.fl import Algorithm, RoundPlan


@dataclass
class OptimizerSettings:
    """AdamW per tier and session (the same elementwise update as one optimizer over the whole model)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def make(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
        if not params:
            return None
        return torch.optim.AdamW(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


class SessionError(KeyError):
    """A step or update names a session this tier does not hold."""


class Busy(RuntimeError):
    """This tier holds as many sessions as it may; the caller should retry later (HTTP 503)."""


@dataclass
class Session:
    """One (round, user) replica on one tier: its adapters, optimizer state and counters."""

    round_id: int
    user_id: str
    plan: RoundPlan
    algorithm: Algorithm
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    feedback: Any = None  # error feedback of top-k compressed gradients this tier sends
    step_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one step at a time
    last_step: int = -1
    last_reply: Any = None  # the reply to ``last_step``, returned again if that step is retried

    def replay(self, step: int) -> Any:
        """The cached reply when ``step`` is a retry of the last one; refuses steps from the past."""
        if step == self.last_step and self.last_reply is not None:
            return self.last_reply
        if step <= self.last_step:
            raise ValueError(f"step {step} of round {self.round_id}, user '{self.user_id}' is older than the last "
                             f"step served ({self.last_step})")
        return None

    def remember(self, step: int, reply: Any) -> Any:
        self.last_step, self.last_reply = step, reply
        return reply

    @property
    def key(self) -> tuple[int, str]:
        return (self.round_id, self.user_id)
