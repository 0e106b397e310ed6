"""The edge tier's work: middle blocks per session, the relay to the cloud, hierarchical pre-aggregation."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.fl.aggregation import AdapterUpdate, clip_updates
from shared.fl import RoundPlan, create_algorithm
from shared.runtime.session import Busy
from shared.runtime.tier import TierRuntime
from shared.runtime.steps import pack_tokens, unpack_tokens
from shared.protocol.transport import Link, ok
from shared.protocol.wire import Message

log = logging.getLogger("splitllm.edge")

USER_PREFIX, EDGE_PREFIX = "user/", "edge/"


@dataclass
class PendingRound:
    """One (round, phase) at this edge: who is expected, and what has come back."""

    plans: dict[str, RoundPlan]
    previous: dict[str, dict[str, torch.Tensor]]
    clip_norm: float | None = None
    user_updates: list[AdapterUpdate] = field(default_factory=list)
    edge_updates: list[AdapterUpdate] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    timer: threading.Timer | None = None

    @property
    def settled(self) -> bool:
        return len(self.metrics) + len(self.missing) >= len(self.plans)


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class EdgeServer:
    """A relay for many users: one edge replica per (round, user), pre-averaging its users' updates.

    A round's start may carry a deadline: users silent past it are dropped, and the edge reports
    the users that did report (possibly none) so that the cloud need not wait for them.
    """

    def __init__(self, edge_id: str, runtime: TierRuntime, cloud: Link, ledger: Any = None,
                 max_sessions: int | None = None) -> None:
        self.edge_id, self.runtime, self.cloud = edge_id, runtime, cloud
        self.ledger = ledger  # bytes on the user-edge hop per (round, mode), where a transport measures them
        self.max_sessions = max_sessions
        self.users: dict[str, Link] = {}
        self.user_samples: dict[str, int] = {}
        self.pending: dict[tuple[int, str], PendingRound] = {}
        self.finished: set[tuple[int, str]] = set()  # (round, phase) already reported: a retried start is a no-op
        self.lock = threading.Lock()

    def register_user(self, user_id: str, link: Link, num_samples: int) -> None:
        with self.lock:
            self.users[user_id] = link
            self.user_samples[user_id] = num_samples

    # control -------------------------------------------------------------------------------
    def on_start(self, msg: Message) -> Message:
        """Open edge sessions for the listed users, then start each user."""
        plans = [RoundPlan.from_meta(p) for p in msg.meta["plans"]]
        if not plans:
            raise ValueError("a start message needs at least one plan")
        round_id, phase = plans[0].round_id, plans[0].mode
        key = (round_id, phase)
        unknown = [p.user_id for p in plans if p.user_id not in self.users]
        if unknown:
            raise KeyError(f"edge {self.edge_id} has no registered user(s) {unknown}")
        with self.lock:
            if key in self.pending or key in self.finished:  # a retried start: under way or done
                return ok(round=round_id, edge=self.edge_id, users=len(plans))
            self._drop_older(round_id)
            if self.max_sessions is not None and len(self.runtime.sessions) + len(plans) > self.max_sessions:
                raise Busy(f"edge {self.edge_id} holds {len(self.runtime.sessions)} sessions; "
                           f"{len(plans)} more would pass its limit of {self.max_sessions}")
            pending = PendingRound({p.user_id: p for p in plans},
                                   previous={"user": split_prefixed(msg.tensors, USER_PREFIX),
                                             "edge": split_prefixed(msg.tensors, EDGE_PREFIX)},
                                   clip_norm=msg.meta.get("clip_norm"))
            self.pending[key] = pending
        for plan in plans:
            self.runtime.open_session(plan, pending.previous["edge"])
        deadline = msg.meta.get("deadline")
        if deadline:
            pending.timer = threading.Timer(float(deadline), self._expire, (key,))
            pending.timer.daemon = True
            pending.timer.start()
        for plan in plans:
            tensors = {USER_PREFIX + k: v for k, v in pending.previous["user"].items()}
            start = Message(kind="start", meta={"plan": plan.to_meta()}, tensors=tensors,
                            codecs=dict.fromkeys(tensors, self.runtime.policy("user_edge").downloads))
            try:
                self.users[plan.user_id].request("start", start)
            except Exception as exc:  # an unreachable user is dropped from this round, not the round
                log.warning("round %s: could not start %s: %s", round_id, plan.user_id, exc)
                self._drop_user(key, plan.user_id)
        return ok(round=round_id, edge=self.edge_id, users=len(plans))

    def _drop_older(self, round_id: int) -> None:
        """Leftovers of earlier rounds (failed or timed out at the cloud) go when a newer round starts."""
        for key in [k for k in self.pending if k[0] < round_id]:
            stale = self.pending.pop(key)
            if stale.timer:
                stale.timer.cancel()
        self.runtime.drop_sessions(keep=lambda k: k[0] >= round_id)

    def _drop_user(self, key: tuple[int, str], user_id: str) -> None:
        report = None
        with self.lock:
            pending = self.pending.get(key)
            if pending is None or user_id in pending.metrics or user_id in pending.missing:
                return
            pending.missing.add(user_id)
            if (key[0], user_id) in self.runtime.sessions:
                self.runtime.close_session(key[0], user_id)
            if pending.settled:
                report = self._finish(key)
        if report is not None:
            self.cloud.request("update", report)

    def _expire(self, key: tuple[int, str]) -> None:
        """The deadline passed: drop the silent users and report the others."""
        with self.lock:
            pending = self.pending.get(key)
            silent = [] if pending is None else [u for u in pending.plans
                                                 if u not in pending.metrics and u not in pending.missing]
        for user_id in silent:
            log.warning("round %s (%s): user %s silent past the deadline; dropped", key[0], key[1], user_id)
            self._drop_user(key, user_id)

    def on_update(self, msg: Message) -> Message:
        """A user's report; once every user has reported or been dropped, one update goes up."""
        round_id, user_id, mode = int(msg.meta["round"]), str(msg.meta["user"]), str(msg.meta["mode"])
        key = (round_id, mode)
        with self.lock:
            pending = self.pending.get(key)
            if pending is None or user_id not in pending.plans or user_id in pending.missing:
                raise KeyError(f"edge {self.edge_id}: no {mode} round {round_id} expects user '{user_id}'")
            if user_id in pending.metrics:  # a retried update: already counted
                return ok(round=round_id, user=user_id)
            num_samples = int(msg.meta["num_samples"])
            if mode == "train":
                state = split_prefixed(msg.tensors, USER_PREFIX)
                plan = pending.plans[user_id]
                create_algorithm(plan.algorithm, plan.config).validate_update(
                    "user", state, pending.previous["user"], f"user {user_id}")
                session = self.runtime.close_session(round_id, user_id)
                pending.user_updates.append(AdapterUpdate(user_id, "user", state, num_samples))
                pending.edge_updates.append(AdapterUpdate(user_id, "edge", self.runtime.pack_update(session), num_samples))
            else:
                self.runtime.close_session(round_id, user_id)
            pending.metrics[user_id] = msg.meta["metrics"]
            report = self._finish(key) if pending.settled else None
        if report is not None:
            self.cloud.request("update", report)
        return ok(round=round_id, user=user_id)

    def _finish(self, key: tuple[int, str]) -> Message:
        """Pre-aggregate what came in (call with the lock held) and build the report for the cloud."""
        pending = self.pending.pop(key)
        self.finished = {k for k in self.finished if k[0] >= key[0] - 1} | {key}
        if pending.timer:
            pending.timer.cancel()
        round_id, mode = key
        tensors: dict[str, torch.Tensor] = {}
        total = sum(self.user_samples.get(u, 0) for u in pending.metrics)
        if mode == "train" and pending.user_updates:
            total = sum(u.num_samples for u in pending.user_updates)  # the weights the users reported
            plan = next(iter(pending.plans.values()))
            algorithm = create_algorithm(plan.algorithm, plan.config)
            for tier, updates, prefix in (("user", pending.user_updates, USER_PREFIX),
                                          ("edge", pending.edge_updates, EDGE_PREFIX)):
                if updates[0].state:
                    updates = clip_updates(updates, pending.previous[tier], pending.clip_norm)
                    state = algorithm.aggregate(tier, updates, pending.previous[tier])
                    tensors.update({prefix + k: v for k, v in state.items()})
        meta = {"round": round_id, "edge": self.edge_id, "mode": mode, "num_samples": total,
                "metrics": pending.metrics, "missing": sorted(pending.missing)}
        if self.ledger is not None:
            meta["bytes"] = self.ledger.get(key)
        return Message(kind="update", meta=meta, tensors=tensors,
                       codecs=dict.fromkeys(tensors, self.runtime.policy("edge_cloud").uploads))

    # the step chain ----------------------------------------------------------------------------
    def on_step(self, msg: Message) -> Message:
        """Forward through this edge's blocks, relay to the cloud, backward with its gradient."""
        session = self.runtime.session(msg.meta["round"], msg.meta["user"])
        with session.step_lock:  # a retry arriving while the first attempt runs waits, then gets its reply
            return self._step(session, msg)

    def _step(self, session: Any, msg: Message) -> Message:
        step = int(msg.meta["step"])
        cached = session.replay(step)
        if cached is not None:
            return cached
        train = session.plan.mode == "train"
        self.runtime.check_step(msg.tensors["hidden"], msg.tensors["attention_mask"], msg.tensors["labels"])
        mask = msg.tensors["attention_mask"]
        hidden_in = unpack_tokens(msg.tensors["hidden"].to(self.runtime.device), mask).requires_grad_(train)
        out = self.runtime.forward(session, hidden_in, mask, step)
        reply = self.cloud.request("step", Message(kind="step", meta=msg.meta, tensors={
            "hidden": pack_tokens(out.detach(), mask), "attention_mask": mask, "labels": msg.tensors["labels"]},
            codecs={"hidden": self.runtime.policy("edge_cloud").activations}))
        if not train:
            return session.remember(step, reply)
        grad = reply.tensors["grad"]
        if list(grad.shape) != list(msg.tensors["hidden"].shape) or not torch.isfinite(grad).all():
            raise ValueError(f"the cloud sent a non-finite or mis-shaped gradient {list(grad.shape)}")
        self.runtime.backward_and_step(session, [out], [unpack_tokens(grad.to(out.device, out.dtype), mask)])
        grad_in = hidden_in.grad if hidden_in.grad is not None else torch.zeros_like(hidden_in)
        grad_in, codecs = self.runtime.outgoing_grad(session, pack_tokens(grad_in, mask), "user_edge")
        return session.remember(step, Message(kind="grad", meta=reply.meta, tensors={"grad": grad_in}, codecs=codecs))
