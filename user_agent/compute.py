"""The user tier's work: local batches through embeddings + first blocks, the chain, local updates."""

from __future__ import annotations

import time
from typing import Any

import torch

from shared.fl import RoundPlan
from shared.data.batching import Batch, BatchSampler, eval_batches
from shared.data.datasets import ClientData
from shared.model.sources import Tokenizer
from shared.runtime.session import Session
from shared.runtime.tier import TierRuntime
from shared.runtime.steps import pack_tokens, unpack_tokens
from shared.protocol.transport import Link, ok
from shared.protocol.wire import Message

USER_PREFIX = "user/"


def step_message(plan: RoundPlan, step: int, hidden: torch.Tensor, batch: Batch, codec: str = "fp32") -> Message:
    """The forward message of one step: activation plus the small metadata every tier rebuilds from."""
    return Message(
        kind="step",
        meta={"round": plan.round_id, "user": plan.user_id, "step": step, "mode": plan.mode},
        tensors={"hidden": pack_tokens(hidden.detach(), batch.attention_mask),
                 "attention_mask": batch.attention_mask.to(torch.uint8), "labels": batch.labels},
        codecs={"hidden": codec},
    )


class UserAgent:
    """A device: its data, the user partition, and a link to its edge."""

    def __init__(self, user_id: str, runtime: TierRuntime, data: ClientData, tokenizer: Tokenizer,
                 edge: Link, max_len: int = 128, eval_batch_size: int = 32, slowdown: float = 1.0,
                 pad_to_max: bool = False) -> None:
        if slowdown < 1.0:
            raise ValueError(f"a device's slowdown factor must be >= 1 (got {slowdown})")
        self.user_id, self.runtime, self.data, self.edge = user_id, runtime, data, edge
        self.slowdown = slowdown  # simulated heterogeneous device: its compute takes this many times longer
        task = runtime.spec.task
        self.sampler = BatchSampler(tokenizer, data.train, task, max_len, pad_to_max)
        self.eval_data = eval_batches(tokenizer, data.eval, task, max_len, eval_batch_size)
        self.policy = runtime.policy("user_edge")

    @property
    def num_samples(self) -> int:
        return len(self.data.train)

    def on_start(self, msg: Message) -> Message:
        """Run this user's part of a round (train or eval) and report to the edge."""
        plan = RoundPlan.from_meta(msg.meta["plan"])
        state = {k[len(USER_PREFIX):]: v for k, v in msg.tensors.items() if k.startswith(USER_PREFIX)}
        if plan.mode == "train":
            report = self.train(plan, state)
        else:
            report = self.evaluate(plan, state)
        self.edge.request("update", report)
        return ok(round=plan.round_id, user=self.user_id)

    def train(self, plan: RoundPlan, state: dict[str, torch.Tensor]) -> Message:
        session = self.runtime.open_session(plan, state)
        try:
            return self._train(session, plan)
        finally:
            self.runtime.close_session(plan.round_id, self.user_id)

    def _train(self, session: Session, plan: RoundPlan) -> Message:
        batches = self.sampler.round_batches(plan.seed, plan.round_id, self.user_id, plan.local_steps, plan.batch_size)
        losses: list[float] = []
        step_seconds: list[float] = []
        compute = 0.0
        shape: list[int] = []
        started = time.perf_counter()
        for step, batch in enumerate(batches):
            shape = shape or list(batch.input_ids.shape)
            t0 = step_start = time.perf_counter()
            hidden = self.runtime.forward(session, None, batch.attention_mask, step, input_ids=batch.input_ids)
            compute += self._slow(time.perf_counter() - t0)
            reply = self.edge.request("step", step_message(plan, step, hidden, batch, self.policy.activations))
            grad = reply.tensors["grad"]
            tokens = int(batch.attention_mask.sum())
            if list(grad.shape) != [tokens, hidden.shape[-1]] or not torch.isfinite(grad).all():
                raise ValueError(f"the edge sent a gradient of shape {list(grad.shape)} with non-finite or "
                                 f"mismatched values for {tokens} tokens of width {hidden.shape[-1]}")
            t0 = time.perf_counter()
            grad = unpack_tokens(grad.to(hidden.device, hidden.dtype), batch.attention_mask)
            self.runtime.backward_and_step(session, [hidden], [grad])
            compute += self._slow(time.perf_counter() - t0)
            losses.append(float(reply.meta["loss"]))
            session.samples += batch.size
            step_seconds.append(time.perf_counter() - step_start)
        update = self.runtime.pack_update(session)
        metrics: dict[str, Any] = {
            "train_loss": sum(losses) / max(len(losses), 1), "losses": losses, "steps": len(losses),
            "step_seconds": step_seconds, "batch_shape": shape,
            "seconds": time.perf_counter() - started, "user_compute_seconds": compute,
        }
        return Message(
            kind="update",
            meta={"round": plan.round_id, "user": self.user_id, "mode": "train", "num_samples": self.num_samples,
                  "metrics": metrics},
            tensors={USER_PREFIX + k: v for k, v in update.items()},
            codecs={USER_PREFIX + k: self.policy.uploads for k in update},
        )

    def _slow(self, seconds: float) -> float:
        """Stretch a compute phase to ``slowdown`` times its length; returns the stretched length."""
        if self.slowdown > 1.0:
            time.sleep(seconds * (self.slowdown - 1.0))
        return seconds * self.slowdown

    def evaluate(self, plan: RoundPlan, state: dict[str, torch.Tensor]) -> Message:
        session = self.runtime.open_session(plan, state)
        totals = {"loss_sum": 0.0, "count": 0, "correct": 0, "examples": 0}
        try:
            for step, batch in enumerate(self.eval_data):
                hidden = self.runtime.forward(session, None, batch.attention_mask, step, input_ids=batch.input_ids)
                reply = self.edge.request("step", step_message(plan, step, hidden, batch, self.policy.activations))
                for key in ("loss_sum", "count", "correct"):
                    totals[key] += reply.meta[key]
                totals["examples"] += batch.size
        finally:
            self.runtime.close_session(plan.round_id, self.user_id)
        return Message(kind="update", meta={"round": plan.round_id, "user": self.user_id, "mode": "eval",
                                            "num_samples": len(self.data.eval), "metrics": totals})
