"""The user tier's work: local batches through embeddings + first blocks, the chain, local updates.

A round's start returns at once (``accepted``); the device trains in a thread of its own and reports
to its edge when done. The services and the simulator both run users this way.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from shared.data.batching import EVAL_BATCH_SIZE, Batch, BatchSampler, eval_batches
from shared.data.datasets import ClientData
from shared.model.tokenizers import Tokenizer
from shared.protocol.enums import Hop, Mode
from shared.protocol.messages import (BackwardRequest, EvalReply, OutputReply, RoundPlan, StepRequest, TrainReply,
                                      Update, ack)
from shared.protocol.starts import UserStart
from shared.protocol.transport import Link
from shared.protocol.wire import Message
from shared.runtime.loss import head_counts, head_loss, label_count
from shared.runtime.session import Session
from shared.runtime.steps import check_grad, pack_tokens, unpack_tokens
from shared.runtime.tier import TierRuntime

log = logging.getLogger("splitllm.user")


def step_request(plan: RoundPlan, step: int, hidden: torch.Tensor, batch: Batch, labels: bool = True) -> StepRequest:
    """The forward message of one step: the real tokens' activations plus what every tier rebuilds from (and the
    labels, unless the chain is U-shaped: then they stay here)."""
    return StepRequest(plan.round_id, plan.user_id, step, plan.mode, pack_tokens(hidden.detach(), batch.attention_mask),
                       batch.attention_mask.to(torch.uint8), batch.labels if labels else None)


class UserAgent:
    """A device: its data, the user partition, and a link to its edge."""

    def __init__(self, user_id: str, runtime: TierRuntime, data: ClientData, tokenizer: Tokenizer,
                 edge: Link, max_len: int = 128, eval_batch_size: int = EVAL_BATCH_SIZE, slowdown: float = 1.0,
                 pad_to_max: bool = False) -> None:
        if slowdown < 1.0:
            raise ValueError(f"a device's slowdown factor must be >= 1 (got {slowdown})")
        self.user_id, self.runtime, self.data, self.edge = user_id, runtime, data, edge
        self.slowdown = slowdown  # simulated heterogeneous device: its compute takes this many times longer
        task = runtime.spec.task
        self.sampler = BatchSampler(tokenizer, data.train, task, max_len, pad_to_max)
        self.eval_data = eval_batches(tokenizer, data.eval, task, max_len, eval_batch_size)
        self.policy = runtime.policy(Hop.USER_EDGE)
        self.u_shaped = runtime.spec.u_shaped  # the head and the loss are on this device
        # a = b = L, U-shaped: the whole model is here (federated learning's device), so a step sends nothing: the
        # serving tiers would run no block and no head; only the round's start and update cross the link
        self.whole = self.u_shaped and runtime.split.a == runtime.split.num_layers
        self.jobs: dict[str, str] = {}  # "<round>:<mode>" -> running | reported | failed
        self.last_error: str | None = None
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    @property
    def num_samples(self) -> int:
        return len(self.data.train)

    # a round's start --------------------------------------------------------------------------
    def on_start(self, msg: Message) -> Message:
        """Accept a round's start and run this user's part of it (train or eval) in its own thread."""
        start = UserStart.from_message(msg)
        plan = start.plan
        key = f"{plan.round_id}:{plan.mode}"
        with self.lock:
            first = key not in self.jobs  # a retried start is a no-op
            if first:
                self.jobs[key] = "running"
        if first:
            thread = threading.Thread(target=self._run, args=(start, key), name=f"{self.user_id}-round-{key}", daemon=True)
            with self.lock:
                self.threads = [t for t in self.threads if t.is_alive()] + [thread]
            thread.start()
        return ack("accepted", round=plan.round_id, user=self.user_id)

    def wait(self, timeout: float | None = None) -> None:
        """Until this device's round jobs have finished (the simulator waits so that a round's bytes are all counted)."""
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(timeout)

    def _run(self, start: UserStart, key: str) -> None:
        try:
            report = self.train(start.plan, start.adapters) if start.plan.training else self.evaluate(start.plan, start.adapters)
            self.edge.request("update", report)
            self.jobs[key] = "reported"
        except Exception as exc:
            self.jobs[key] = "failed"
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("round %s failed on device %s", key, self.user_id)
            notice = Update.failure(start.plan.round_id, self.user_id, start.plan.mode, self.last_error)
            try:  # the edge drops this user now; if it cannot be told, its deadline does
                self.edge.request("update", notice.to_message())
            except Exception as told:
                log.warning("could not tell the edge that round %s failed here: %s", key, told)

    # training and evaluation ---------------------------------------------------------------------
    def train(self, plan: RoundPlan, state: dict[str, torch.Tensor]) -> Message:
        session = self.runtime.open_session(plan, state)
        try:
            return self._train(session, plan)
        finally:
            self.runtime.close_session(plan.round_id, self.user_id)

    def _train(self, session: Session, plan: RoundPlan) -> Message:
        batches = self.sampler.round_batches(plan.seed, plan.round_id, self.user_id, plan.local_steps, plan.batch_size)
        clock = self.runtime.clock  # the simulator's virtual clock, or None: the wall clock
        losses: list[float] = []
        step_seconds: list[float] = []
        compute = 0.0
        shape: list[int] = []
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=plan.micro_batches, thread_name_prefix=f"{self.user_id}-micro") as pool:
            for step, batch in enumerate(batches):
                shape = shape or list(batch.input_ids.shape)
                step_start = time.perf_counter()
                charged = clock.elapsed(plan.round_id, self.user_id) if clock else 0.0
                loss, seconds = self._train_step(session, plan, step, batch, pool)
                compute += seconds
                losses.append(loss)
                session.samples += batch.size
                step_seconds.append(clock.elapsed(plan.round_id, self.user_id) - charged if clock
                                    else time.perf_counter() - step_start)
        wall = time.perf_counter() - started
        metrics: dict[str, Any] = {
            "train_loss": sum(losses) / max(len(losses), 1), "losses": losses, "steps": len(losses),
            "step_seconds": step_seconds, "batch_shape": shape, "seconds": sum(step_seconds) if clock else wall,
            "user_compute_seconds": clock.account(plan.round_id, self.user_id)["user"] if clock else compute,
            "wall_seconds": wall, "clock": "virtual" if clock else "wall", "user_blocks_run": session.blocks_run,
        }
        update = Update(plan.round_id, self.user_id, Mode.TRAIN, self.num_samples, metrics, self.runtime.pack_update(session))
        return update.to_message(self.policy.uploads)

    def _train_step(self, session: Session, plan: RoundPlan, step: int, batch: Batch,
                    pool: ThreadPoolExecutor) -> tuple[float, float]:
        """One step, its batch split into the plan's micro-batches: (the step's loss, this device's compute seconds).

        The micro-batches go through the chain as a pipeline (GPipe order here): each one's forward, then its
        exchange with the edge in a thread of its own, while the next one's forward runs; then the backward
        of each as its gradient comes back, and one optimizer step. The serving tiers run each micro-batch's
        backward as soon as its gradient comes down to them. The losses of the micro-batches are their shares of
        the batch's mean (``label_count``), so the gradients add up to the unsplit step's. One micro-batch is
        the unsplit step, exchanged on this thread.
        """
        micros = batch.split(plan.micro_batches)
        count = label_count(self.runtime.spec.task, batch.labels) if len(micros) > 1 else None
        if self.whole:
            return self._local_step(session, step, micros, count)
        compute = 0.0
        sent: list[tuple[torch.Tensor, StepRequest, Future]] = []
        for m, micro in enumerate(micros):
            t0 = time.perf_counter()
            hidden = self.runtime.forward(session, None, micro.attention_mask, step, input_ids=micro.input_ids)
            compute += self._slow(time.perf_counter() - t0)
            request = step_request(plan, step, hidden, micro, labels=not self.u_shaped)
            request.micro, request.label_count = (m, len(micros)), None if self.u_shaped else count
            if len(micros) > 1:
                sent.append((hidden, request, pool.submit(self._exchange, session, request, micro, count)))
            else:
                done: Future = Future()
                done.set_result(self._exchange(session, request, micro, count))
                sent.append((hidden, request, done))
        loss = 0.0
        for hidden, request, reply in sent:
            answer, head_seconds = reply.result()
            compute += head_seconds
            check_grad(answer.grad, request.hidden, "the edge")
            t0 = time.perf_counter()
            grad = unpack_tokens(answer.grad.to(hidden.device, hidden.dtype), request.attention_mask)
            self.runtime.backward(session, [hidden], [grad])
            compute += self._slow(time.perf_counter() - t0)
            loss += answer.loss
        t0 = time.perf_counter()
        self.runtime.step(session)
        return loss, compute + self._slow(time.perf_counter() - t0)

    def _local_step(self, session: Session, step: int, micros: list[Batch], count: int | None) -> tuple[float, float]:
        """A step with the whole chain on this device: each micro-batch's forward, head, loss and backward, then the
        update; (the step's loss, its compute seconds)."""
        t0 = time.perf_counter()
        loss = 0.0
        for micro in micros:
            hidden = self.runtime.forward(session, None, micro.attention_mask, step, input_ids=micro.input_ids)
            labels = micro.labels.to(self.runtime.device)
            part = self.runtime.head(session, hidden, micro.attention_mask,
                                     partial(head_loss, self.runtime.spec.task, labels=labels, count=count))
            self.runtime.backward(session, [part], [None])
            loss += float(part.detach())
        self.runtime.step(session)
        return loss, self._slow(time.perf_counter() - t0)

    def _exchange(self, session: Session, request: StepRequest, batch: Batch,
                  count: int | None) -> tuple[TrainReply, float]:
        """One (micro-)batch's step request to the edge, and in a U-shaped chain the loss here and the backward request;
        the gradient of its activations, and the seconds this device computed meanwhile."""
        reply = self.edge.request("step", request.to_message(self.policy.activations))
        seconds = 0.0
        if self.u_shaped:  # the head and the loss are here: the output's gradient goes back in a second request
            t0 = time.perf_counter()
            out_grad, loss = self._head_loss_backward(session, reply, request, batch, count)
            seconds = self._slow(time.perf_counter() - t0)
            back = BackwardRequest(request.round, self.user_id, request.step, loss, out_grad, request.micro)
            reply = self.edge.request("backward", back.to_message(self.policy.gradients))
        return TrainReply.from_message(reply), seconds

    def _head(self, session: Session, reply: Message, request: StepRequest, labels: torch.Tensor,
              count: int | None = None) -> tuple[torch.Tensor, Any]:
        """U-shaped chain: the cloud's output rows (a leaf, for their gradient) through this device's head, and the
        loss (training; ``count``: the step's, where this is one of its micro-batches) or the held-out counts."""
        rows = OutputReply.from_message(reply).hidden
        check_grad(rows, request.hidden, "the edge")  # output rows are shaped like the step's activations
        out = unpack_tokens(rows.to(self.runtime.device, torch.float32), request.attention_mask)
        out.requires_grad_(session.plan.training)
        task = self.runtime.spec.task
        if session.plan.training:
            return out, self.runtime.head(session, out, request.attention_mask,
                                          lambda head: head_loss(task, head, labels, count))
        return out, self.runtime.head(session, out, request.attention_mask, lambda head: head_counts(task, head, labels))

    def _head_loss_backward(self, session: Session, reply: Message, request: StepRequest,
                            batch: Batch, count: int | None) -> tuple[torch.Tensor, float]:
        """The loss on this device, backpropagated into the head's tensors and the cloud's output rows."""
        out, loss = self._head(session, reply, request, batch.labels.to(self.runtime.device), count)
        torch.autograd.backward(loss)
        grad = out.grad if out.grad is not None else torch.zeros_like(out)
        return pack_tokens(grad, request.attention_mask), float(loss.detach())

    def _slow(self, seconds: float) -> float:
        """Stretch a compute phase to ``slowdown`` times its length (not under a virtual clock, which charges it)."""
        if self.slowdown > 1.0 and self.runtime.clock is None:
            time.sleep(seconds * (self.slowdown - 1.0))
        return seconds * self.slowdown

    def evaluate(self, plan: RoundPlan, state: dict[str, torch.Tensor]) -> Message:
        session = self.runtime.open_session(plan, state)
        totals = {"loss_sum": 0.0, "count": 0, "correct": 0, "examples": 0}
        try:
            for step, batch in enumerate(self.eval_data):
                hidden = self.runtime.forward(session, None, batch.attention_mask, step, input_ids=batch.input_ids)
                if self.whole:
                    labels = batch.labels.to(self.runtime.device)
                    counts = self.runtime.head(session, hidden, batch.attention_mask,
                                               partial(head_counts, self.runtime.spec.task, labels=labels))
                    self._add(totals, counts, batch.size)
                    continue
                request = step_request(plan, step, hidden, batch, labels=not self.u_shaped)
                reply = self.edge.request("step", request.to_message(self.policy.activations))
                if self.u_shaped:
                    _, counts = self._head(session, reply, request, batch.labels.to(self.runtime.device))
                else:
                    counts = EvalReply.from_message(reply)
                self._add(totals, counts, batch.size)
        finally:
            self.runtime.close_session(plan.round_id, self.user_id)
        return Update(plan.round_id, self.user_id, Mode.EVAL, len(self.data.eval), totals).to_message()

    @staticmethod
    def _add(totals: dict[str, Any], counts: EvalReply, examples: int) -> None:
        totals["loss_sum"] += counts.loss_sum
        totals["count"] += counts.count
        totals["correct"] += counts.correct
        totals["examples"] += examples
