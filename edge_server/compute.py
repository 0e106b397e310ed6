"""The edge tier's work: middle blocks per session, the relay to the cloud, hierarchical pre-aggregation."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.aggregation import AdapterUpdate
from shared.algorithms import RoundPlan, create_algorithm
from shared.tier import TierRuntime
from shared.transport import Link, ok
from shared.wire import Message

USER_PREFIX, EDGE_PREFIX = "user/", "edge/"


@dataclass
class PendingRound:
    """One (round, phase) at this edge: who is expected, and what has come back."""

    plans: dict[str, RoundPlan]
    user_updates: list[AdapterUpdate] = field(default_factory=list)
    edge_updates: list[AdapterUpdate] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    previous: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class EdgeServer:
    """A relay for many users: one edge replica per (round, user), pre-averaging its users' updates."""

    def __init__(self, edge_id: str, runtime: TierRuntime, cloud: Link, ledger: Any = None) -> None:
        self.edge_id, self.runtime, self.cloud = edge_id, runtime, cloud
        self.ledger = ledger  # bytes on the user-edge hop per (round, mode), where a transport measures them
        self.users: dict[str, Link] = {}
        self.user_samples: dict[str, int] = {}
        self.pending: dict[tuple[int, str], PendingRound] = {}
        self.lock = threading.Lock()

    def register_user(self, user_id: str, link: Link, num_samples: int) -> None:
        with self.lock:
            self.users[user_id] = link
            self.user_samples[user_id] = num_samples

    # control -------------------------------------------------------------------------------
    def on_start(self, msg: Message) -> Message:
        """Open edge sessions for the listed users, then start each user."""
        plans = [RoundPlan.from_meta(p) for p in msg.meta["plans"]]
        user_state = split_prefixed(msg.tensors, USER_PREFIX)
        edge_state = split_prefixed(msg.tensors, EDGE_PREFIX)
        unknown = [p.user_id for p in plans if p.user_id not in self.users]
        if unknown:
            raise KeyError(f"edge {self.edge_id} has no registered user(s) {unknown}")
        phase = plans[0].mode
        pending = PendingRound({p.user_id: p for p in plans},
                               previous={"user": user_state, "edge": edge_state})
        with self.lock:
            self.pending[(plans[0].round_id, phase)] = pending
        for plan in plans:
            self.runtime.open_session(plan, edge_state)
        for plan in plans:
            start = Message(kind="start", meta={"plan": plan.to_meta()},
                            tensors={USER_PREFIX + k: v for k, v in user_state.items()})
            self.users[plan.user_id].request("start", start)
        return ok(round=plans[0].round_id, edge=self.edge_id, users=len(plans))

    def on_update(self, msg: Message) -> Message:
        """A user's report; once all of this edge's users have reported, send one update up."""
        round_id, user_id, mode = msg.meta["round"], msg.meta["user"], msg.meta["mode"]
        with self.lock:
            pending = self.pending.get((round_id, mode))
        if pending is None or user_id not in pending.plans:
            raise KeyError(f"edge {self.edge_id}: no {mode} round {round_id} expects user '{user_id}'")
        session = self.runtime.close_session(round_id, user_id)
        num_samples = int(msg.meta["num_samples"])
        with self.lock:
            pending.metrics[user_id] = msg.meta["metrics"]
            if mode == "train":
                pending.user_updates.append(AdapterUpdate(user_id, "user", split_prefixed(msg.tensors, USER_PREFIX), num_samples))
                pending.edge_updates.append(AdapterUpdate(user_id, "edge", self.runtime.pack_update(session), num_samples))
            done = len(pending.metrics) == len(pending.plans)
            if done:
                del self.pending[(round_id, mode)]
        if done:
            self.cloud.request("update", self._report(round_id, mode, pending))
        return ok(round=round_id, user=user_id)

    def _report(self, round_id: int, mode: str, pending: PendingRound) -> Message:
        total = sum(self.user_samples.get(u, 0) for u in pending.plans)
        tensors: dict[str, torch.Tensor] = {}
        if mode == "train":
            total = sum(u.num_samples for u in pending.user_updates)  # the weights the users reported
            plan = next(iter(pending.plans.values()))
            algorithm = create_algorithm(plan.algorithm, plan.config)
            for tier, updates, prefix in (("user", pending.user_updates, USER_PREFIX),
                                          ("edge", pending.edge_updates, EDGE_PREFIX)):
                if updates and updates[0].state:
                    state = algorithm.aggregate(tier, updates, pending.previous[tier])
                    tensors.update({prefix + k: v for k, v in state.items()})
        meta = {"round": round_id, "edge": self.edge_id, "mode": mode, "num_samples": total, "metrics": pending.metrics}
        if self.ledger is not None:
            meta["bytes"] = self.ledger.get((round_id, mode))
        return Message(kind="update", meta=meta, tensors=tensors)

    # the step chain ----------------------------------------------------------------------------
    def on_step(self, msg: Message) -> Message:
        """Forward through this edge's blocks, relay to the cloud, backward with its gradient."""
        round_id, user_id, step = msg.meta["round"], msg.meta["user"], msg.meta["step"]
        session = self.runtime.session(round_id, user_id)
        train = session.plan.mode == "train"
        self.runtime.check_step(msg.tensors["hidden"], msg.tensors["attention_mask"], msg.tensors["labels"])
        hidden_in = msg.tensors["hidden"].to(self.runtime.device).requires_grad_(train)
        mask = msg.tensors["attention_mask"]
        out = self.runtime.forward(session, hidden_in, mask, step)
        reply = self.cloud.request("step", Message(kind="step", meta=msg.meta, tensors={
            "hidden": out.detach(), "attention_mask": mask, "labels": msg.tensors["labels"]}))
        if not train:
            return reply
        self.runtime.backward_and_step(session, [out], [reply.tensors["grad"].to(out.device)])
        grad = hidden_in.grad if hidden_in.grad is not None else torch.zeros_like(hidden_in)
        return Message(kind="grad", meta=reply.meta, tensors={"grad": grad})
