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
from shared.protocol.messages import RoundPlan


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
    feedback: Any = None  # error feedback of top-k compressed gradients this tier sends
    step_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one step at a time
    last_step: int = -1
    last_reply: Any = None  # the reply to ``last_step``, returned again if that step is retried
    pending: Any = None  # U-shaped chain: the forward graph of ``last_step``, until its backward request
    last_backward: tuple[int, Any] | None = None  # U-shaped chain: the last backward's step and reply

    @property
    def round_id(self) -> int:
        return self.plan.round_id

    @property
    def user_id(self) -> str:
        return self.plan.user_id

    @property
    def key(self) -> tuple[int, str]:
        return (self.plan.round_id, self.plan.user_id)

    def replay(self, step: int) -> Any:
        """The cached reply when ``step`` is a retry of the last one; None when it is the next one; any other
        step number is refused (422): a session's steps come one after another, from 0."""
        if step == self.last_step and self.last_reply is not None:
            return self.last_reply
        if step <= self.last_step:
            raise InvalidInput(f"step {step} of round {self.round_id}, user '{self.user_id}' is older than the last "
                               f"step served ({self.last_step})")
        if step != self.last_step + 1:
            raise InvalidInput(f"step {step} of round {self.round_id}, user '{self.user_id}' skips ahead: the next "
                               f"step is {self.last_step + 1}")
        return None

    def remember(self, step: int, reply: Any) -> Any:
        self.last_step, self.last_reply = step, reply
        return reply
