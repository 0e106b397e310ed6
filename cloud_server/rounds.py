"""Rounds at the coordinator: plans, starting edges, collecting their updates, aggregating, committing."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


from cloud_server.compute import CloudCompute
from shared.model.adapters import AdapterState, clone_state
from shared.fl.aggregation import AdapterUpdate, clip_updates
from shared.fl import Algorithm, Participant, RoundPlan, create_algorithm
from shared.seeds import derive_seed
from shared.runtime.tier import TierRuntime
from shared.protocol.transport import Link, ok
from shared.protocol.wire import Message
from cloud_server.store import Store

log = logging.getLogger("splitllm.rounds")

TIER_NAMES = ("user", "edge", "cloud")
MAX_DEADLINE = 7 * 24 * 3600.0
KEEP_FINISHED = 16  # finished rounds kept in memory when a store holds the history
ROUND_STATES = ("pending", "running", "aggregating", "committed", "failed", "cancelled")


@dataclass
class RoundRequest:
    """What ``POST /v1/rounds`` takes; every field has a default."""

    participants: list[str] | None = None
    fraction: float | None = None
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    algorithm: str = "fedavg"
    config: dict[str, Any] = field(default_factory=dict)
    evaluate: bool = True
    deadline: float | None = None  # seconds (at most a week): users silent past it are dropped from the round
    min_participants: int = 1  # users that must report for the round to commit
    clip_norm: float | None = None  # clip each update's change to this L2 norm before aggregation

    def __post_init__(self) -> None:
        if self.min_participants < 1 or (self.deadline is not None and not 0 < self.deadline <= MAX_DEADLINE):
            raise ValueError(f"min_participants must be >= 1 and deadline > 0 (got {self.min_participants}, "
                             f"{self.deadline})")
        if self.local_steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"a round needs local_steps >= 1, batch_size >= 1 and lr > 0 "
                             f"(got {self.local_steps}, {self.batch_size}, {self.lr})")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1] (got {self.fraction})")


@dataclass
class RoundRecord:
    round_id: int
    request: RoundRequest
    base_version: int
    state: str = "pending"
    version: int | None = None
    participants: list[str] = field(default_factory=list)
    progress: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RoundError(RuntimeError):
    """A round could not complete; the previous version stays current."""


class RoundCancelled(RoundError):
    """Cancelled through the API; the previous version stays current."""


class Coordinator:
    """The cloud's round driver and the cloud tier's handler (``on_step``, ``on_update``)."""

    def __init__(self, runtime: TierRuntime, initial: dict[str, AdapterState], seed: int = 0,
                 round_timeout: float = 3600.0, store: Store | None = None, ledger: Any = None,
                 grace: float = 30.0) -> None:
        self.runtime = runtime
        self.compute = CloudCompute(runtime)
        self.store = store
        self.ledger = ledger  # bytes on the edge-cloud hop per (round, mode), where a transport measures them
        self.global_state = {t: clone_state(initial[t]) for t in TIER_NAMES}
        self.version = 0
        self.restart_failed: list[int] = []
        if store is not None:
            store.put_initial(self.global_state)
            self.version = store.latest_version() or 0
            self.global_state = store.load_version(self.version)
            self.restart_failed = store.fail_unfinished("the cloud restarted while this round was in progress")
        self.seed = seed
        self.round_timeout = round_timeout
        self.grace = grace  # how long past a round's deadline the cloud waits for edges' reports
        self.edges: dict[str, Link] = {}
        self.edge_users: dict[str, dict[str, int]] = {}
        self.rounds: dict[int, RoundRecord] = {}
        self._cancelled: set[int] = set()
        self.algorithms: dict[str, Algorithm] = {}
        self._reports: dict[tuple[int, str], dict[str, Message]] = {}
        self._round_algorithms: dict[int, Algorithm] = {}
        self._cond = threading.Condition()

    # topology --------------------------------------------------------------------------------
    def register_edge(self, edge_id: str, link: Link) -> None:
        with self._cond:
            self.edges[edge_id] = link
            self.edge_users.setdefault(edge_id, {})

    def register_user(self, edge_id: str, user_id: str, num_samples: int) -> None:
        with self._cond:
            if edge_id not in self.edges:
                raise KeyError(f"unknown edge '{edge_id}'")
            self.edge_users[edge_id][user_id] = num_samples

    def participants(self) -> list[Participant]:
        return [Participant(u, e, n) for e, users in sorted(self.edge_users.items()) for u, n in sorted(users.items())]

    # handlers ----------------------------------------------------------------------------------
    def on_step(self, msg: Message) -> Message:
        return self.compute.on_step(msg)

    def on_update(self, msg: Message) -> Message:
        """An edge's pre-aggregated report for one (round, phase)."""
        key = (int(msg.meta["round"]), str(msg.meta["mode"]))
        edge_id = str(msg.meta.get("edge", ""))
        if edge_id not in self.edges:
            raise KeyError(f"unknown edge '{edge_id}'")
        with self._cond:
            if key not in self._reports:
                raise KeyError(f"no round {key[0]} ({key[1]}) is waiting for updates")
            algorithm = self._round_algorithms.get(key[0])
        if key[1] == "train" and msg.meta.get("metrics") and algorithm is not None:  # users reported: adapters due
            for tier in ("user", "edge"):
                state = {k[len(tier) + 1:]: v for k, v in msg.tensors.items() if k.startswith(f"{tier}/")}
                algorithm.validate_update(tier, state, self.global_state[tier], f"edge {edge_id} ({tier} tier)")
        with self._cond:
            if key not in self._reports:
                raise KeyError(f"no round {key[0]} ({key[1]}) is waiting for updates")
            self._reports[key][edge_id] = msg
            self._cond.notify_all()
        return ok(round=key[0])

    def on_start(self, msg: Message) -> Message:  # the cloud is never started by anyone
        raise KeyError("the cloud does not take start messages")

    # rounds ---------------------------------------------------------------------------------------
    def algorithm_for(self, request: RoundRequest) -> Algorithm:
        """One instance per (name, config), kept across rounds for plug-ins with state (bandits, schedules)."""
        key = f"{request.algorithm}:{sorted(request.config.items())}"
        if key not in self.algorithms:
            self.algorithms[key] = create_algorithm(request.algorithm, request.config)
        return self.algorithms[key]

    def _select(self, request: RoundRequest, round_id: int) -> list[Participant]:
        everyone = self.participants()
        if request.participants:
            known = {p.user_id: p for p in everyone}
            unknown = [u for u in request.participants if u not in known]
            if unknown:
                raise RoundError(f"unknown participants {unknown}")
            return [known[u] for u in sorted(set(request.participants))]
        if request.fraction is not None:
            k = max(1, math.ceil(request.fraction * len(everyone)))
            rng = random.Random(derive_seed(self.seed, round_id, "select"))
            return sorted(rng.sample(everyone, k), key=lambda p: (p.edge_id, p.user_id))
        return everyone

    def new_round(self, request: RoundRequest) -> RoundRecord:
        create_algorithm(request.algorithm, request.config)  # validate before accepting
        with self._cond:
            next_id = max([0, *self.rounds] + ([self.store.next_round_id() - 1] if self.store else [])) + 1
            record = RoundRecord(round_id=next_id, request=request, base_version=self.version)
            self.rounds[record.round_id] = record
        self._save(record)
        return record

    def _save(self, record: RoundRecord) -> None:
        if self.store is None:
            return
        self.store.save_round(record.to_dict())
        with self._cond:  # finished rounds live in the store; keep the few latest in memory
            finished = [rid for rid, r in self.rounds.items() if r.state in ("committed", "failed", "cancelled")]
            for rid in sorted(finished)[:-KEEP_FINISHED]:
                del self.rounds[rid]

    def cancel(self, round_id: int) -> RoundRecord:
        """Cancel a pending or running round; a finished one is left as it is."""
        with self._cond:
            record = self.rounds.get(round_id)
            if record is None:
                raise KeyError(f"no round {round_id} in this process")
            if record.state in ("pending", "running", "aggregating"):
                self._cancelled.add(round_id)
                if record.state == "pending":
                    record.state = "cancelled"
                self._cond.notify_all()
        self._save(record)
        return record

    def _check_cancelled(self, record: RoundRecord) -> None:
        if record.round_id in self._cancelled:
            raise RoundCancelled(f"round {record.round_id} was cancelled")

    def run_round(self, record: RoundRecord) -> RoundRecord:
        """Train, aggregate, commit, then (optionally) evaluate the new version. Blocking."""
        started = time.perf_counter()
        committed = False
        try:
            self._check_cancelled(record)
            chosen = self._select(record.request, record.round_id)
            if not chosen:
                raise RoundError("no registered users to train")
            record.participants = [p.user_id for p in chosen]
            record.progress = {p.user_id: "training" for p in chosen}
            record.state = "running"
            self._save(record)
            algorithm = self.algorithm_for(record.request)
            self._round_algorithms = {record.round_id: algorithm}
            extras = algorithm.configure_round(record.round_id, chosen)
            reports = self._phase(record, chosen, "train", extras, self.global_state)
            self._check_cancelled(record)
            train_metrics = {u: m for r in reports.values() for u, m in r.meta["metrics"].items()}
            needed = min(record.request.min_participants, len(chosen))
            if len(train_metrics) < needed:
                raise RoundError(f"only {len(train_metrics)} of {len(chosen)} users reported "
                                 f"(min_participants={record.request.min_participants})")
            chosen = [p for p in chosen if p.user_id in train_metrics]
            record.state = "aggregating"
            record.progress = {u: "reported" if u in train_metrics else "dropped" for u in record.participants}
            self._save(record)
            new_state = self._aggregate(algorithm, chosen, reports, record)
            record.metrics = self._train_metrics(chosen, train_metrics)
            record.metrics["dropped"] = sorted(set(record.participants) - set(train_metrics))
            record.metrics["bytes"] = self._bytes(reports)
            self._check_cancelled(record)
            record.metrics["seconds"] = time.perf_counter() - started
            durable = {**record.to_dict(), "state": "committed", "version": self.version + 1}
            if self.store is not None:
                self.store.commit(durable, new_state)  # the version's file and row, then the round's state
            with self._cond:  # visible only once durable: state, version and global adapters together
                self.global_state = new_state
                self.version = durable["version"]
                record.version, record.state = durable["version"], "committed"
            committed = True
            if record.request.evaluate:
                self._evaluate_into(record, chosen)
            self._save(record)
            algorithm.after_round(record.round_id, record.metrics)
        except Exception as exc:  # the round fails; the previous version stays current
            if committed:  # only the evaluation after the commit failed
                record.metrics["eval_error"] = f"{type(exc).__name__}: {exc}"
                self._save(record)
                return record
            record.state = "cancelled" if isinstance(exc, RoundCancelled) else "failed"
            record.version = None
            record.error = f"{type(exc).__name__}: {exc}"
            for key in [k for k in list(self.runtime.sessions) if k[0] == record.round_id]:
                self.runtime.close_session(*key)
            self._save(record)
        return record

    def _evaluate_into(self, record: RoundRecord, chosen: list[Participant]) -> None:
        """Held-out metrics of the version just committed, merged into the round's metrics."""
        t0 = time.perf_counter()
        eval_reports = self._phase(record, chosen, "eval", {p.user_id: {} for p in chosen}, self.global_state)
        record.metrics.update(self._eval_metrics(eval_reports))
        for hop, counts in self._bytes(eval_reports).items():
            for d, n in counts.items():
                record.metrics["bytes"][hop][d] += n
        record.metrics["eval_seconds"] = time.perf_counter() - t0
        record.progress = {u: "evaluated" for u in record.participants}

    def _bytes(self, reports: dict[str, Message]) -> dict[str, Any]:
        """Bytes per hop: user-edge as the edges measured it, edge-cloud from this side's ledger."""
        out = {"user_edge": {"up": 0, "down": 0}, "edge_cloud": {"up": 0, "down": 0}}
        for r in reports.values():
            for d in ("up", "down"):
                out["user_edge"][d] += int(r.meta.get("bytes", {}).get(d, 0))
        if self.ledger is not None and reports:
            first = next(iter(reports.values()))
            out["edge_cloud"] = self.ledger.get((int(first.meta["round"]), str(first.meta["mode"])))
        return out

    def evaluate_current(self) -> RoundRecord:
        """Held-out metrics of the current version on every registered user, without training."""
        record = RoundRecord(round_id=0, request=RoundRequest(), base_version=self.version, version=self.version)
        started = time.perf_counter()
        try:
            chosen = self.participants()
            record.participants = [p.user_id for p in chosen]
            reports = self._phase(record, chosen, "eval", {p.user_id: {} for p in chosen}, self.global_state)
            record.metrics = self._eval_metrics(reports)
            record.metrics["seconds"] = time.perf_counter() - started
            record.state = "committed"
        except Exception as exc:
            record.state, record.error = "failed", f"{type(exc).__name__}: {exc}"
        return record

    def _plans(self, record: RoundRecord, chosen: list[Participant], mode: str,
               extras: dict[str, dict[str, Any]]) -> dict[str, RoundPlan]:
        req = record.request
        return {p.user_id: RoundPlan(
            round_id=record.round_id, user_id=p.user_id, local_steps=req.local_steps, batch_size=req.batch_size,
            lr=req.lr, seed=self.seed, algorithm=req.algorithm, config=dict(req.config),
            extra=extras.get(p.user_id, {}), mode=mode) for p in chosen}

    def _phase(self, record: RoundRecord, chosen: list[Participant], mode: str,
               extras: dict[str, dict[str, Any]], state: dict[str, AdapterState]) -> dict[str, Message]:
        """Start the chosen users through their edges and collect the edges' reports.

        An edge that cannot be started, or does not report by the deadline (plus a grace period),
        is left out: its users count as dropped, and ``min_participants`` decides the round.
        """
        plans = self._plans(record, chosen, mode, extras)
        for plan in plans.values():
            self.runtime.open_session(plan, state["cloud"])
        by_edge: dict[str, list[RoundPlan]] = {}
        for p in chosen:
            by_edge.setdefault(p.edge_id, []).append(plans[p.user_id])
        key = (record.round_id, mode)
        with self._cond:
            self._reports[key] = {}
        algorithm = self._round_algorithms.get(record.round_id) or self.algorithm_for(record.request)
        tensors = {f"user/{k}": v for k, v in algorithm.pack_download("user", state["user"], record.round_id).items()}
        tensors.update({f"edge/{k}": v for k, v in algorithm.pack_download("edge", state["edge"], record.round_id).items()})
        req = record.request
        started: list[str] = []
        try:
            for edge_id, edge_plans in sorted(by_edge.items()):
                start = Message(kind="start", meta={"plans": [p.to_meta() for p in edge_plans], "deadline": req.deadline,
                                                    "clip_norm": req.clip_norm}, tensors=tensors,
                                codecs=dict.fromkeys(tensors, self.runtime.policy("edge_cloud").downloads))
                try:
                    self.edges[edge_id].request("start", start)
                    started.append(edge_id)
                except Exception as exc:  # an unreachable edge: its users are dropped from this round
                    log.warning("round %s (%s): could not start edge %s: %s", record.round_id, mode, edge_id, exc)
            timeout = min(req.deadline + self.grace, self.round_timeout) if req.deadline else self.round_timeout
            with self._cond:
                self._cond.wait_for(
                    lambda: all(e in self._reports[key] for e in started) or record.round_id in self._cancelled,
                    timeout=timeout)
                reports = self._reports.pop(key)
            self._check_cancelled(record)
            if not reports:
                raise RoundError(f"round {record.round_id} ({mode}): no edge reported "
                                 f"({len(started)} of {len(by_edge)} started)")
        except BaseException:
            self._drop_sessions(plans.values())
            raise
        finally:
            with self._cond:
                self._reports.pop(key, None)
        reported = {u for r in reports.values() for u in r.meta["metrics"]}
        self._drop_sessions([p for u, p in plans.items() if mode == "eval" or u not in reported])
        return reports

    def _drop_sessions(self, plans: Any) -> None:
        for plan in plans:
            if (plan.round_id, plan.user_id) in self.runtime.sessions:
                self.runtime.close_session(plan.round_id, plan.user_id)

    def _aggregate(self, algorithm: Algorithm, chosen: list[Participant], reports: dict[str, Message],
                   record: RoundRecord) -> dict[str, AdapterState]:
        new_state: dict[str, AdapterState] = {}
        reports = {e: r for e, r in reports.items() if r.meta["metrics"]}  # edges all of whose users dropped add nothing
        for tier in ("user", "edge"):
            prefix = f"{tier}/"
            updates = [AdapterUpdate(edge_id, tier, {k[len(prefix):]: v for k, v in r.tensors.items() if k.startswith(prefix)},
                                     int(r.meta["num_samples"])) for edge_id, r in reports.items()]
            if self.global_state[tier]:
                new_state[tier] = algorithm.aggregate(tier, updates, self.global_state[tier])
            else:
                new_state[tier] = {}
        cloud_updates: list[AdapterUpdate] = []
        for p in chosen:
            session = self.runtime.close_session(record.round_id, p.user_id)
            cloud_updates.append(AdapterUpdate(p.user_id, "cloud", self.runtime.pack_update(session), p.num_samples))
        cloud_updates = clip_updates(cloud_updates, self.global_state["cloud"], record.request.clip_norm)
        new_state["cloud"] = (algorithm.aggregate("cloud", cloud_updates, self.global_state["cloud"])
                              if self.global_state["cloud"] else {})
        return new_state

    @staticmethod
    def _train_metrics(chosen: list[Participant], per_user: dict[str, dict[str, Any]]) -> dict[str, Any]:
        losses = [per_user[p.user_id]["train_loss"] for p in chosen if p.user_id in per_user]
        return {"train_loss": sum(losses) / max(len(losses), 1),
                "users": dict(sorted(per_user.items()))}

    def _eval_metrics(self, reports: dict[str, Message]) -> dict[str, Any]:
        loss_sum = count = correct = 0.0
        for r in reports.values():
            for m in r.meta["metrics"].values():
                loss_sum += m["loss_sum"]
                count += m["count"]
                correct += m["correct"]
        eval_loss = loss_sum / max(count, 1)
        out: dict[str, Any] = {"eval_loss": eval_loss}
        if self.runtime.spec.task == "cls":
            out["eval_accuracy"] = correct / max(count, 1)
        else:
            out["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
            out["eval_token_accuracy"] = correct / max(count, 1)
        return out
