"""Rounds at the coordinator: plans, starting edges, collecting their reports, aggregating, committing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cloud_server.compute import CloudCompute
from cloud_server.aggregation import aggregate_round
from cloud_server.metrics import drop_reasons, eval_metrics, hop_bytes, merge_eval, own_held_out, train_metrics
from cloud_server.records import FINISHED, RoundCancelled, RoundError, RoundRecord
from cloud_server.store import Store
from cloud_server.topology import Topology
from shared.config.round import RoundConfig
from shared.errors import InvalidInput, NotFound
from shared.fl.aggregation import AdapterUpdate
from shared.fl.namespaces import with_prefix, within
from shared.fl.robust import AggregationPolicy
from shared.fl.plugin import ModelInfo, Participant, Strategy, StrategyContext, get_algorithm
from shared.http.metrics import ByteLedger
from shared.model.adapters import clone_state
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import TIERS, Hop, Mode, Tier
from shared.protocol.fields import check_metrics_size
from shared.protocol.messages import Report, RoundPlan, ack
from shared.protocol.starts import RoundStart
from shared.protocol.wire import Message
from shared.runtime.tier import TierRuntime

log = logging.getLogger("splitllm.rounds")

KEEP_FINISHED = 16  # finished rounds kept in memory when a store holds the history


class Coordinator(Topology):
    """The cloud's round driver and the cloud tier's handler (``on_step``, ``on_update``).

    ``runtime`` is the cloud tier of the one deployment, or one per deployment by name (a federation of
    several models): their keys in the global state then carry the ``<deployment>/`` prefix, and each
    edge serves one of them.
    """

    def __init__(self, runtime: TierRuntime | Mapping[str, TierRuntime], initial: AdapterBundle, seed: int = 0,
                 round_timeout: float = 3600.0, store: Store | None = None, ledger: ByteLedger | None = None,
                 grace: float = 30.0) -> None:
        runtimes = dict(runtime) if isinstance(runtime, Mapping) else {"": runtime}
        super().__init__(next(iter(runtimes)))
        self.runtimes = runtimes
        self.runtime = next(iter(runtimes.values()))  # the default deployment's
        self.prefixes = {name: f"{name}/" if len(runtimes) > 1 else "" for name in runtimes}
        self.computes = {name: CloudCompute(rt) for name, rt in runtimes.items()}
        self.store = store
        self.ledger = ledger  # bytes on the edge-cloud hop per (round, mode), where a transport measures them
        self.global_state = AdapterBundle({t: clone_state(initial[t]) for t in TIERS})
        self.version = 0
        if store is not None:
            store.put_initial(self.global_state)
            self.version = store.latest_version() or 0
            self.global_state = store.load_version(self.version)
            store.fail_unfinished("the cloud restarted while this round was in progress")
        self.seed = seed
        self.round_timeout = round_timeout
        self.grace = grace  # how long past a round's deadline the cloud waits for edges' reports
        self.rounds: dict[int, RoundRecord] = {}
        self.strategies: dict[str, Strategy] = {}
        self._cancelled: set[int] = set()
        self._reports: dict[tuple[int, Mode], dict[str, Report]] = {}
        self._started: dict[tuple[int, Mode], dict[str, set[str]]] = {}  # the users each edge was started with
        self._arrived: dict[tuple[int, Mode, str], Report] = {}  # accepted, waiting for ``after_update``
        self._running: tuple[int, Strategy, AdapterBundle] | None = None  # the round in progress, its base state
        self.start_security: Callable[[list[RoundPlan], str, float], dict[str, Any]] | None = None  # revoked, tickets

    def _deployment(self, user_id: str) -> str:
        return self.deployment_of(user_id) if len(self.runtimes) > 1 else self.default_deployment

    def runtime_of(self, user_id: str) -> TierRuntime:
        """The cloud tier of the deployment a registered user trains."""
        return self.runtimes[self._deployment(user_id)]

    # handlers ----------------------------------------------------------------------------------
    def on_step(self, msg: Message) -> Message:
        return self.computes[self._deployment(str(msg.meta.get("user")))].on_step(msg)

    def on_backward(self, msg: Message) -> Message:
        return self.computes[self._deployment(str(msg.meta.get("user")))].on_backward(msg)

    def on_update(self, msg: Message) -> Message:
        """An edge's report for one (round, phase): its users' pre-averaged adapters and metrics.

        It counts for the round once the transport has counted its bytes too (``after_update``).
        """
        report = Report.from_message(msg)
        key = (report.round, report.mode)
        if report.edge not in self.edges:
            raise NotFound(f"unknown edge '{report.edge}'")
        with self._cond:
            if key not in self._reports:
                raise NotFound(f"no round {key[0]} ({key[1]}) is waiting for updates")
            started = self._started[key].get(report.edge, set())
            running, strangers = self._running, {*report.metrics, *report.missing, *report.reasons} - started
        if strangers:  # another edge's users: their weights and metrics are not this edge's to give
            raise InvalidInput(f"edge {report.edge} reports users it was not started with in round {key[0]} ({key[1]}): "
                               f"{', '.join(sorted(strangers)[:5])}")
        steps = record.request.local_steps if (record := self.rounds.get(report.round)) else 0
        for user, metrics in report.metrics.items():
            check_metrics_size(metrics, steps, f"edge {report.edge}'s metrics of user {user}", relayed=True)
        prefix = self.prefixes.get(self.edge_deployment.get(report.edge, ""), "")
        if report.mode is Mode.TRAIN and report.metrics and running is not None and running[0] == report.round:
            _, strategy, base = running
            for tier in (Tier.USER, Tier.EDGE):
                strategy.validate_update(tier, report.adapters.get(tier, {}), within(base[tier], prefix),
                                         f"edge {report.edge} ({tier} tier)")
        report.adapters = AdapterBundle({t: with_prefix(state, prefix) for t, state in report.adapters.items()})
        with self._cond:
            if key not in self._reports:
                raise NotFound(f"no round {key[0]} ({key[1]}) is waiting for updates")
            self._arrived[(*key, report.edge)] = report
        return ack(round=report.round)

    def after_update(self, msg: Message) -> None:
        """The transport has counted a report and its reply: the round may now read its bytes and go on."""
        meta = msg.meta
        with self._cond:
            report = self._arrived.pop((meta.get("round"), meta.get("mode"), meta.get("edge")), None)
            key = (meta.get("round"), meta.get("mode"))
            if report is not None and key in self._reports:
                self._reports[key][report.edge] = report
                self._cond.notify_all()

    # rounds ---------------------------------------------------------------------------------------
    def strategy_for(self, request: RoundConfig) -> Strategy:
        """One strategy per (algorithm, config), kept across rounds for plug-ins with state (bandits, schedules)."""
        key = f"{request.algorithm}:{sorted(request.config.items())}"
        if key not in self.strategies:
            models = {name: ModelInfo(rt.spec, rt.source.num_layers, self.prefixes[name], rt.source) for name, rt in self.runtimes.items()}
            ctx = StrategyContext(Tier.CLOUD, self.runtime.spec, self.seed, models=models,
                                  num_layers=self.runtime.split.num_layers)
            self.strategies[key] = get_algorithm(request.algorithm).strategy(request.config, ctx)
        return self.strategies[key]

    def new_round(self, request: RoundConfig) -> RoundRecord:
        """Record a round to run; the algorithm and its config are checked first (``InvalidInput``: 422)."""
        request = request.resolved(self.runtime.spec.task)
        algorithm = get_algorithm(request.algorithm)
        for rt in self.runtimes.values():
            algorithm.strategy_cls.check_request(algorithm.parse_config(request.config), request, rt.spec,
                                                 rt.split.num_layers)
        if request.participants:
            known = {p.user_id for p in self.participants()}
            unknown = sorted(set(request.participants) - known)
            if unknown:
                raise InvalidInput(f"unknown participants {unknown[:10]}: registered users are {sorted(known)[:20]}")
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
            finished = [rid for rid, r in self.rounds.items() if r.state in FINISHED]
            for rid in sorted(finished)[:-KEEP_FINISHED]:
                del self.rounds[rid]

    def cancel(self, round_id: int) -> RoundRecord:
        """Cancel a pending or running round; a finished one is left as it is."""
        with self._cond:
            record = self.rounds.get(round_id)
            if record is None:
                raise NotFound(f"no round {round_id} in this process")
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
            chosen = self.select(record.request, self.seed, record.round_id)
            if not chosen:
                raise RoundError("no registered users to train")
            record.participants = [p.user_id for p in chosen]
            record.progress = {p.user_id: "training" for p in chosen}
            record.state = "running"
            self._save(record)
            strategy = self.strategy_for(record.request)
            base = strategy.before_round(record.round_id, self.global_state)
            self._running = (record.round_id, strategy, base)
            extras = strategy.configure_round(record.round_id, chosen)
            reports = self._phase(record, chosen, Mode.TRAIN, extras, base, strategy)
            self._check_cancelled(record)
            per_user = {u: m for r in reports.values() for u, m in r.metrics.items()}
            reasons = drop_reasons(reports, [p.user_id for p in chosen])
            needed = min(record.request.min_participants, len(chosen))
            record.progress = {u: "reported" if u in per_user else "dropped" for u in record.participants}
            if len(per_user) < needed:  # the round fails: who reported, who was dropped and why stay on record
                record.metrics = {"dropped": sorted(set(record.participants) - set(per_user)), "drop_reasons": reasons}
                why = "; ".join(f"{u}: {r}" for u, r in list(reasons.items())[:5])
                raise RoundError(f"only {len(per_user)} of {len(chosen)} users reported "
                                 f"(min_participants={record.request.min_participants})" + (f": {why}" if why else ""))
            chosen = [p for p in chosen if p.user_id in per_user]
            record.state = "aggregating"
            self._save(record)
            new_state, clipped, cloud_compute = self._aggregate(strategy, chosen, reports, record, base)
            record.metrics = train_metrics([p.user_id for p in chosen], per_user, cloud_compute)
            if own := strategy.round_metrics(record.round_id, new_state):
                record.metrics[record.request.algorithm] = own
            clipped.update({f"edge {e}": r.clipped for e, r in reports.items() if r.clipped})
            if clipped:
                record.metrics["clipped"] = clipped
            record.metrics["dropped"] = sorted(set(record.participants) - set(per_user))
            if reasons:
                record.metrics["drop_reasons"] = reasons
            record.metrics["bytes"] = hop_bytes(reports, self.ledger, (record.round_id, Mode.TRAIN))
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
                self._evaluate_into(record, chosen, strategy)
            self._save(record)
            strategy.after_round(record.round_id, record.metrics)
        except Exception as exc:  # the round fails; the previous version stays current
            if committed:  # only the evaluation after the commit failed
                record.metrics["eval_error"] = f"{type(exc).__name__}: {exc}"
                self._save(record)
                return record
            record.state = "cancelled" if isinstance(exc, RoundCancelled) else "failed"
            record.version = None
            record.error = f"{type(exc).__name__}: {exc}"
            record.progress = {u: s if s in ("reported", "dropped") else record.state for u, s in record.progress.items()}
            for key in [k for k in list(self.runtime.sessions) if k[0] == record.round_id]:
                self.runtime.close_session(*key)
            self._save(record)
        finally:
            self._running = None
        return record

    def _evaluate_into(self, record: RoundRecord, chosen: list[Participant], strategy: Strategy) -> None:
        """Held-out metrics of the version just committed, merged into the round's metrics."""
        t0 = time.perf_counter()
        reports = self._phase(record, chosen, Mode.EVAL, {p.user_id: {} for p in chosen}, self.global_state, strategy)
        merge_eval(record.metrics, eval_metrics(reports, self._task_of(chosen)),
                   hop_bytes(reports, self.ledger, (record.round_id, Mode.EVAL)))
        evaluated = {u for r in reports.values() for u in r.metrics}
        record.metrics["eval_seconds"] = time.perf_counter() - t0
        record.progress = {u: "evaluated" if u in evaluated else "dropped" for u in record.participants}

    def evaluate_current(self) -> RoundRecord:
        """Held-out metrics of the current version on every registered user, without training."""
        request = RoundConfig().resolved(self.runtime.spec.task)
        record = RoundRecord(round_id=0, request=request, base_version=self.version, version=self.version)
        started = time.perf_counter()
        try:
            chosen = self.participants()
            record.participants = [p.user_id for p in chosen]
            reports = self._phase(record, chosen, Mode.EVAL, {p.user_id: {} for p in chosen}, self.global_state,
                                  self.strategy_for(request))
            record.metrics = eval_metrics(reports, self._task_of(chosen))
            record.metrics["seconds"] = time.perf_counter() - started
            record.state = "committed"
        except Exception as exc:
            record.state, record.error = "failed", f"{type(exc).__name__}: {exc}"
        return record

    def _task_of(self, chosen: list[Participant]) -> dict[str, tuple[str, str]]:
        """Each user's task in round metrics (``<deployment>/<data>`` in a federation of several) and its kind."""
        out = {}
        for p in chosen:
            rt = self.runtimes[p.deployment or self.default_deployment]
            name = self.prefixes[p.deployment or self.default_deployment] + rt.task_name(p.data)
            out[p.user_id] = (name, rt.task_variant(p.data).spec.task)
        return out

    def _plans(self, record: RoundRecord, chosen: list[Participant], mode: Mode,
               extras: dict[str, dict[str, Any]]) -> dict[str, RoundPlan]:
        req = record.request
        return {p.user_id: RoundPlan(
            round_id=record.round_id, user_id=p.user_id, local_steps=req.local_steps, batch_size=req.batch_size,
            lr=float(req.lr), seed=self.seed, algorithm=req.algorithm, config=dict(req.config),
            extra=extras.get(p.user_id, {}), mode=mode, data=p.data, cut=p.cut, rank=p.rank,
            micro_batches=req.micro_batches) for p in chosen}

    def _phase(self, record: RoundRecord, chosen: list[Participant], mode: Mode, extras: dict[str, dict[str, Any]],
               state: AdapterBundle, strategy: Strategy) -> dict[str, Report]:
        """Start the chosen users through their edges and collect the edges' reports.

        An edge that cannot be started, or does not report by the deadline (plus a grace period),
        is left out: its users count as dropped, and ``min_participants`` decides the round.
        """
        plans = self._plans(record, chosen, mode, extras)
        for p in chosen:
            name = p.deployment or self.default_deployment
            self.runtimes[name].open_session(plans[p.user_id], within(state[Tier.CLOUD], self.prefixes[name]))
        by_edge: dict[str, list[RoundPlan]] = {}
        weights = {p.user_id: p.num_samples for p in chosen}
        for p in chosen:
            by_edge.setdefault(p.edge_id, []).append(plans[p.user_id])
        key = (record.round_id, mode)
        with self._cond:
            self._reports[key] = {}
            self._started[key] = {e: {p.user_id for p in ps} for e, ps in by_edge.items()}
        download = AdapterBundle({tier: strategy.pack_download(tier, state[tier], record.round_id)
                                  for tier in (Tier.USER, Tier.EDGE)})
        req = record.request
        codec = self.runtime.policy(Hop.EDGE_CLOUD).downloads
        timeout = min(req.deadline + self.grace, self.round_timeout) if req.deadline else self.round_timeout

        def start_edge(edge_id: str) -> str | None:
            """Start one edge with its own deployment's adapters; why not, if it could not be started."""
            edge_plans, prefix = by_edge[edge_id], self.prefixes.get(self.edge_deployment.get(edge_id, ""), "")
            own = AdapterBundle({tier: within(part, prefix) for tier, part in download.items()})
            start = RoundStart(edge_plans, own, deadline=req.deadline, clip_norm=req.clip_norm, trim=req.trim,
                               clip_factor=req.clip_factor, aggregator=req.aggregator,
                               weights={p.user_id: weights[p.user_id] for p in edge_plans},
                               **(self.start_security(edge_plans, edge_id, timeout) if self.start_security else {}))
            try:
                self.edges[edge_id].request("start", start.to_message(codec))
                return None
            except Exception as exc:  # an unreachable edge: its users are dropped from this round
                log.warning("round %s (%s): could not start edge %s: %s", record.round_id, mode, edge_id, exc)
                return str(exc)[:300]
        try:  # all at once: an edge slow to start its users holds up no other edge
            with ThreadPoolExecutor(max_workers=max(1, min(len(by_edge), 16)), thread_name_prefix="start") as pool:
                outcome = dict(zip(sorted(by_edge), pool.map(start_edge, sorted(by_edge))))
            started = [e for e, why in outcome.items() if why is None]
            errors = {e: why for e, why in outcome.items() if why is not None}
            with self._cond:
                self._cond.wait_for(
                    lambda: all(e in self._reports[key] for e in started) or record.round_id in self._cancelled,
                    timeout=timeout)
                reports = self._reports.pop(key)
            self._check_cancelled(record)
            if not reports:
                why = "; ".join(f"{e}: {r}" for e, r in errors.items()) or f"the deadline passed ({req.deadline} s)"
                raise RoundError(f"round {record.round_id} ({mode}): no edge reported "
                                 f"({len(started)} of {len(by_edge)} started): {why}")
        except BaseException:
            self._drop_sessions(plans.values())
            raise
        finally:
            with self._cond:
                self._reports.pop(key, None)
                self._started.pop(key, None)
                for stale in [k for k in self._arrived if k[:2] == key]:
                    del self._arrived[stale]
        if mode is Mode.EVAL:
            own_held_out(reports, record.round_id, self.runtime_of)
        reported = {u for r in reports.values() for u in r.metrics}
        self._drop_sessions([p for u, p in plans.items() if mode is Mode.EVAL or u not in reported])
        return reports

    def _drop_sessions(self, plans: Any) -> None:
        for plan in plans:
            for runtime in self.runtimes.values():
                if (plan.round_id, plan.user_id) in runtime.sessions:
                    runtime.close_session(plan.round_id, plan.user_id)

    def _aggregate(self, strategy: Strategy, chosen: list[Participant], reports: dict[str, Report],
                   record: RoundRecord, base: AdapterBundle) -> tuple[AdapterBundle, dict[str, Any], dict[str, Any]]:
        """Every tier's new global adapters, whose updates were clipped to what bound, the cloud's compute per user.
        An edge weighs as its reporting users' weights (the cloud's); the policy clips and combines (``shared.fl.robust``)."""
        req, weight = record.request, {p.user_id: p.num_samples for p in chosen}
        reports = {e: r for e, r in reports.items() if r.metrics}  # edges all of whose users dropped add nothing
        updates_of: dict[Tier, list[AdapterUpdate]] = {
            tier: [AdapterUpdate(edge_id, tier, r.adapters.get(tier, {}), sum(weight.get(u, 0) for u in r.metrics))
                   for edge_id, r in reports.items()] for tier in (Tier.USER, Tier.EDGE)}
        updates_of[Tier.CLOUD] = []
        compute: dict[str, Any] = {}
        for p in chosen:
            name = p.deployment or self.default_deployment
            session = self.runtimes[name].close_session(record.round_id, p.user_id)
            compute[p.user_id] = dict(seconds=session.compute_seconds, blocks_run=session.blocks_run, steps=session.steps)
            update = with_prefix(self.runtimes[name].pack_update(session), self.prefixes[name])
            updates_of[Tier.CLOUD].append(AdapterUpdate(p.user_id, Tier.CLOUD, update, p.num_samples))
        policy = AggregationPolicy(req.clip_norm, req.clip_factor, req.aggregator, req.trim)
        return (*aggregate_round(strategy, updates_of, base, policy), compute)
