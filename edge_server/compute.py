"""The edge tier's work: middle blocks per session, the relay to the cloud, hierarchical pre-aggregation."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.errors import Busy, InvalidInput, NotFound
from shared.fl.aggregation import AdapterUpdate
from shared.fl.cuts import at_cut, restack
from shared.fl.robust import AggregationPolicy, combine
from shared.fl.plugin import Strategy, StrategyContext, get_algorithm
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Hop, Mode, Tier
from shared.protocol.fields import as_number, check_metrics_size
from shared.protocol.messages import (BackwardRequest, EvalReply, OutputReply, Report, RoundPlan, StepRequest,
                                      TrainReply, Update, ack)
from shared.protocol.starts import RoundStart, UserStart
from shared.protocol.transport import Link
from shared.protocol.wire import Message
from shared.runtime.session import Session
from shared.runtime.steps import Downstream, Pending, check_grad, pack_tokens, serve_backward, serve_step, unpack_tokens
from shared.runtime.tier import TierRuntime

log = logging.getLogger("splitllm.edge")

REGISTRATION_WAIT = 60.0  # the longest a start waits, in all, for listed users' registrations under way here (s)


@dataclass
class PendingRound:
    """One (round, phase) at this edge: who is expected, and what has come back."""

    plans: dict[str, RoundPlan]
    previous: AdapterBundle  # what came down: the global user- and edge-side adapters (as the download packs them)
    strategy: Strategy  # this round's pre-aggregation and arrival checks
    policy: AggregationPolicy = field(default_factory=AggregationPolicy)
    weights: dict[str, int] = field(default_factory=dict)  # the cloud's weight of each user
    user_updates: list[AdapterUpdate] = field(default_factory=list)
    edge_updates: list[AdapterUpdate] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # user -> why it was dropped
    timer: threading.Timer | None = None
    downloads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # what each user's device started from

    @property
    def settled(self) -> bool:
        return len(self.metrics) + len(self.missing) >= len(self.plans)


class EdgeServer:
    """A relay for many users: one edge replica per (round, user), pre-averaging its users' updates.

    A round's start may carry a deadline: users silent past it are dropped, and the edge reports
    the users that did report (possibly none) so that the cloud need not wait for them.
    """

    def __init__(self, edge_id: str, runtime: TierRuntime, cloud: Link, ledger: Any = None,
                 max_sessions: int | None = None, on_revoked: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.edge_id, self.runtime, self.cloud = edge_id, runtime, cloud
        self.on_revoked = on_revoked  # the cloud's revoked credentials, with each start (the service's verifier)
        self.ledger = ledger  # bytes on the user-edge hop per (round, mode), where a transport measures them
        self.max_sessions = max_sessions
        self.users: dict[str, Link] = {}
        self.user_samples: dict[str, int] = {}
        self.pending: dict[tuple[int, Mode], PendingRound] = {}
        self.finished: set[tuple[int, Mode]] = set()  # (round, phase) already reported: a retried start is a no-op
        self.outbox: dict[tuple[int, Mode], Report] = {}  # a (round, phase)'s settled report, to send
        # users whose update this edge took in but whose bytes the transport has not counted yet (``after_update``)
        self.uncounted: dict[tuple[int, Mode], set[str]] = {}
        self.starting: dict[tuple[int, Mode], threading.Event] = {}  # set once every user of a phase was started
        self.arriving: dict[str, threading.Event] = {}  # users whose registration is under way, set once it ends
        self.lock = threading.Lock()

    @contextmanager
    def arriving_user(self, user_id: str) -> Iterator[None]:
        """A registration under way (the cloud asked, then the blocks from the user's cut loaded, then
        ``register_user``): the cloud knows the user before this edge does, so a start listing it waits for this."""
        event = threading.Event()
        with self.lock:
            self.arriving[user_id] = event
        try:
            yield
        finally:
            with self.lock:
                if self.arriving.get(user_id) is event:
                    del self.arriving[user_id]
            event.set()

    def register_user(self, user_id: str, link: Link, num_samples: int, cut: int | None = None) -> None:
        """A user behind this edge; with a cut of its own (a_u), this edge serves it blocks [a_u, b)."""
        if cut is not None:
            self.runtime.hold_from(cut)
        with self.lock:
            self.users[user_id] = link
            self.user_samples[user_id] = num_samples

    # control -------------------------------------------------------------------------------
    def on_start(self, msg: Message) -> Message:
        """Open edge sessions for the listed users, then start each user; a listed user this edge does not know
        is dropped from the round, once any registration of it under way here has ended."""
        start = RoundStart.from_message(msg)
        until = time.monotonic() + REGISTRATION_WAIT  # in all: users re-registering cannot hold a start longer
        for plan in start.plans:
            with self.lock:
                arriving = self.arriving.get(plan.user_id)
            if arriving is not None and not arriving.wait(max(0.0, until - time.monotonic())):
                log.warning("round %s: %s still registering; not waited for", plan.round_id, plan.user_id)
        if start.revoked is not None and self.on_revoked is not None:
            self.on_revoked(start.revoked)
        round_id, phase = start.plans[0].round_id, start.plans[0].mode
        key = (round_id, phase)
        with self.lock:
            if key in self.pending or key in self.finished:  # a retried start: under way or done
                return ack(round=round_id, edge=self.edge_id, users=len(start.plans))
            self._drop_older(round_id)
            if self.max_sessions is not None and len(self.runtime.sessions) + len(start.plans) > self.max_sessions:
                raise Busy(f"edge {self.edge_id} holds {len(self.runtime.sessions)} sessions; "
                           f"{len(start.plans)} more would pass its limit of {self.max_sessions}")
            plan = start.plans[0]
            ctx = StrategyContext(Tier.EDGE, self.runtime.spec, num_layers=self.runtime.split.num_layers)
            strategy = get_algorithm(plan.algorithm).strategy(plan.config, ctx)
            policy = AggregationPolicy(start.clip_norm, start.clip_factor, start.aggregator, start.trim)
            pending = PendingRound({p.user_id: p for p in start.plans}, start.adapters, strategy, policy, start.weights)
            self.pending[key] = pending
            starts_done = self.starting[key] = threading.Event()
            links = {p.user_id: self.users[p.user_id] for p in start.plans if p.user_id in self.users}
        known = [p for p in start.plans if p.user_id in links]  # one snapshot: each user is started or dropped
        for plan in known:  # each user's own cut divides the round's adapters between its device and this edge
            device, edge = at_cut(pending.previous, self.runtime.spec.split[0] if plan.cut is None else plan.cut)
            pending.downloads[plan.user_id] = device
            self.runtime.open_session(plan, edge)
        if start.deadline:
            pending.timer = threading.Timer(float(start.deadline), self._expire, (key,))
            pending.timer.daemon = True
            pending.timer.start()
        codec = self.runtime.policy(Hop.USER_EDGE).downloads
        try:  # a report settled here is sent at once (``_send``): ``_report`` would wait for this very start
            for plan in start.plans:
                if plan.user_id not in links:  # e.g. this edge restarted: the user re-registers at its next heartbeat
                    self._send(self._drop_user(key, plan.user_id, f"not registered at {self.edge_id} (did the edge restart?)"))

            def start_user(plan: RoundPlan) -> None:
                try:
                    ticket = (start.tickets or {}).get(plan.user_id)  # the cloud's, relayed as it came
                    message = UserStart(plan, pending.downloads[plan.user_id], ticket).to_message(codec)
                    links[plan.user_id].request("start", message)
                except Exception as exc:  # an unreachable user is dropped from this round, not the round
                    log.warning("round %s: could not start %s: %s", round_id, plan.user_id, exc)
                    self._send(self._drop_user(key, plan.user_id, f"could not be started: {exc}"))

            # all at once: a user slow to accept its start (at most its link's timeout) holds up no other user
            with ThreadPoolExecutor(max_workers=max(1, min(len(known), 16)), thread_name_prefix="start") as pool:
                list(pool.map(start_user, known))
        finally:
            with self.lock:
                self.starting.pop(key, None)
            starts_done.set()
        return ack(round=round_id, edge=self.edge_id, users=len(known))

    def _drop_older(self, round_id: int) -> None:
        """Leftovers of earlier rounds (failed or timed out at the cloud) go when a newer round starts."""
        for key in [k for k in self.pending if k[0] < round_id]:
            stale = self.pending.pop(key)
            if stale.timer:
                stale.timer.cancel()
        for table in (self.outbox, self.uncounted):
            for key in [k for k in table if k[0] < round_id]:
                del table[key]
        self.runtime.drop_sessions(keep=lambda k: k[0] >= round_id)

    def _drop_user(self, key: tuple[int, Mode], user_id: str, reason: str) -> Report | None:
        """Drop a user from a (round, phase), saying why; the report for the cloud once that settles it."""
        with self.lock:
            pending = self.pending.get(key)
            if pending is None or user_id in pending.metrics or user_id in pending.missing:
                return None
            pending.missing[user_id] = reason[:300]
            if (key[0], user_id) in self.runtime.sessions:
                self.runtime.close_session(key[0], user_id)
            return self._finish(key) if pending.settled else None

    def _send(self, report: Report | None) -> None:
        """Report to the cloud, with the (round, phase)'s bytes on the user-edge hop as counted now."""
        if report is None:
            return
        if self.ledger is not None:
            report.bytes = self.ledger.get((report.round, report.mode))
        self.cloud.request("update", report.to_message(self.runtime.policy(Hop.EDGE_CLOUD).uploads))

    def _expire(self, key: tuple[int, Mode]) -> None:
        """The deadline passed: drop the silent users and report the others."""
        with self.lock:
            pending = self.pending.get(key)
            silent = [] if pending is None else [u for u in pending.plans
                                                 if u not in pending.metrics and u not in pending.missing]
        for user_id in silent:
            log.warning("round %s (%s): user %s silent past the deadline; dropped", key[0], key[1], user_id)
            self._report(self._drop_user(key, user_id, "silent past the round's deadline"))

    def on_update(self, msg: Message) -> Message:
        """A user's report; once every user has reported or been dropped, one report goes up (``after_update``).

        A user that could not do its part says so (``metrics.error``): it is dropped at once, as if
        its deadline had passed.
        """
        update = Update.from_message(msg)
        key = (update.round, update.mode)
        with self.lock:
            pending = self.pending.get(key)
            if pending is None or update.user not in pending.plans or update.user in pending.missing:
                raise NotFound(f"edge {self.edge_id}: no {update.mode} round {update.round} expects user '{update.user}'")
            check_metrics_size(update.metrics, pending.plans[update.user].local_steps, f"user {update.user}'s metrics")
            if update.user in pending.metrics:  # a retried update: already counted
                return ack(round=update.round, user=update.user)
            self.uncounted.setdefault(key, set()).add(update.user)
            try:
                report = self._accept(pending, key, update) if update.error is None else None
            except BaseException:  # refused: the transport calls no after_update for it
                self.uncounted[key].discard(update.user)
                raise
        if update.error is not None:
            log.warning("round %s (%s): user %s failed: %s", key[0], key[1], update.user, update.error)
            report = self._drop_user(key, update.user, f"failed on the device: {update.error}")
        if report is not None:
            with self.lock:
                self.outbox[key] = report
        return ack(round=update.round, user=update.user)

    def after_update(self, msg: Message) -> None:
        """Once the transport has counted an update and its reply: send the report of its (round, phase) if that is
        settled and every update taken in for it has been counted.

        The report carries the round's bytes on the user-edge hop, so it goes only after every update's own
        bytes are in the ledger, whichever update settled it (two users' updates may be counted in either
        order), and after every start's (``_report``).
        """
        key, user = (msg.meta.get("round"), msg.meta.get("mode")), msg.meta.get("user")
        with self.lock:
            waiting = self.uncounted.get(key, set())
            waiting.discard(user)
            report = None if waiting else self.outbox.pop(key, None)
            if report is not None:
                self.uncounted.pop(key, None)
        self._report(report)

    def _report(self, report: Report | None) -> None:
        """Send a report once this edge has started every user of its phase: a user may report before the
        edge has read the reply to its start, and that start's bytes belong to the round too."""
        if report is None:
            return
        with self.lock:
            starting = self.starting.get((report.round, report.mode))
        if starting is not None:
            starting.wait()
        self._send(report)

    def _accept(self, pending: PendingRound, key: tuple[int, Mode], update: Update) -> Report | None:
        """Count a user's update (call with the lock held); the report for the cloud once the round is settled."""
        if update.mode is Mode.TRAIN:
            loss = as_number(update.metrics.get("train_loss"), f"user {update.user}'s metrics.train_loss")
            if loss < 0:
                raise InvalidInput(f"user {update.user}'s train_loss must not be negative")
            pending.strategy.validate_update(Tier.USER, update.adapters, pending.downloads[update.user],
                                             f"user {update.user}")
            session = self.runtime.close_session(update.round, update.user)
            weight = pending.weights.get(update.user, update.num_samples)  # the cloud's; self-reported only in-process
            stacked = restack(update.adapters, self.runtime.pack_update(session), self.runtime.spec.split[0])
            pending.user_updates.append(AdapterUpdate(update.user, Tier.USER, stacked[Tier.USER], weight))
            pending.edge_updates.append(AdapterUpdate(update.user, Tier.EDGE, stacked[Tier.EDGE], weight))
            pending.metrics[update.user] = {**update.metrics, "edge_compute_seconds": session.compute_seconds,
                                            "edge_blocks_run": session.blocks_run, "edge_steps": session.steps}
        else:  # the held-out sums of the eval replies this edge relayed, not the user's word for them
            session = self.runtime.session(update.round, update.user)
            sums = session.held_out.sums(update.metrics, f"user {update.user}", self.runtime.serves(session.plan))
            self.runtime.close_session(update.round, update.user)
            pending.metrics[update.user] = {**update.metrics, **sums}
        return self._finish(key) if pending.settled else None

    def _finish(self, key: tuple[int, Mode]) -> Report:
        """Pre-aggregate what came in (call with the lock held) and build the report for the cloud."""
        pending = self.pending.pop(key)
        self.finished = {k for k in self.finished if k[0] >= key[0] - 1} | {key}
        if pending.timer:
            pending.timer.cancel()
        round_id, mode = key
        states: dict[Tier, dict[str, torch.Tensor]] = {}
        clipped: dict[str, Any] = {}
        total = sum(self.user_samples.get(u, 0) for u in pending.metrics)
        if mode is Mode.TRAIN and pending.user_updates:
            total = sum(u.num_samples for u in pending.user_updates)  # the weights the cloud gave
            for tier, updates in ((Tier.USER, pending.user_updates), (Tier.EDGE, pending.edge_updates)):
                if updates[0].state:
                    combined = combine(pending.strategy, tier, updates, pending.previous[tier], pending.policy)
                    if combined.clipped:
                        log.warning("round %s: %s-side updates of %s clipped to %.4g", round_id, tier,
                                    combined.clipped, combined.bound)
                        clipped[tier.value] = {"bound": combined.bound, "sources": combined.clipped}
                    states[tier] = combined.state
        return Report(round=round_id, edge=self.edge_id, mode=mode, num_samples=total, metrics=pending.metrics,
                      missing=sorted(pending.missing), reasons=dict(sorted(pending.missing.items())), clipped=clipped,
                      adapters=AdapterBundle(states))

    # the step chain ----------------------------------------------------------------------------
    def on_step(self, msg: Message) -> Message:
        """Forward through this edge's blocks, relay to the cloud, backward with its gradient."""
        return serve_step(self.runtime, msg, self.relay, Hop.USER_EDGE)

    def on_backward(self, msg: Message) -> Message:
        """U-shaped chain: the gradient of the cloud's output, from the user, on its way back through this edge."""
        return serve_backward(self.runtime, msg, self.relay_back, Hop.USER_EDGE)

    def relay(self, session: Session, request: StepRequest, out: torch.Tensor) -> Downstream:
        """The edge's next stage: the cloud, with this edge's output rows."""
        mask = request.attention_mask
        forward = StepRequest(request.round, request.user, request.step, request.mode,
                              pack_tokens(out.detach(), mask), mask, request.labels, request.micro, request.label_count)
        reply = self.cloud.request("step", forward.to_message(self.runtime.policy(Hop.EDGE_CLOUD).activations))
        if self.runtime.spec.u_shaped:  # the cloud's output rows go on to the user's head
            rows = OutputReply.from_message(reply).hidden
            check_grad(rows, request.hidden, "the cloud")  # an output, shaped like any activation of the step
            codec = self.runtime.policy(Hop.USER_EDGE).activations
            return Downstream(reply=OutputReply(rows).to_message(codec), output=out if session.plan.training else None)
        if not session.plan.training:
            counts = EvalReply.from_message(reply)
            return Downstream(reply=counts.to_message(), counts=counts)
        answer = TrainReply.from_message(reply)
        check_grad(answer.grad, request.hidden, "the cloud")
        return Downstream(output=out, grad=unpack_tokens(answer.grad.to(out.device, out.dtype), mask), loss=answer.loss)

    def relay_back(self, session: Session, request: BackwardRequest, pending: Pending) -> torch.Tensor:
        """The gradient of the cloud's output goes on to the cloud; the gradient of its input is that of this
        edge's output."""
        back = BackwardRequest(request.round, request.user, request.step, request.loss, request.grad, request.micro)
        answer = TrainReply.from_message(self.cloud.request("backward", back.to_message(
            self.runtime.policy(Hop.EDGE_CLOUD).gradients)))
        rows = pack_tokens(pending.out, pending.mask)
        check_grad(answer.grad, rows, "the cloud")
        return answer.grad
