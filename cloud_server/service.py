"""The cloud as a service: the deployment it fixes, its store, the coordinator, the rounds queue."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from cloud_server.records import ROUND_STATES, RoundRecord
from cloud_server.registration import Ident, UserIn, check_registration
from cloud_server.rounds import Coordinator
from cloud_server.store import Store
from shared.config.federation import Deployment, federation_from
from shared.config.placement import Placement, assign, device_bytes
from shared.config.round import merge
from shared.config.settings import CloudSettings
from shared.errors import InvalidInput, NotFound
from shared.http.auth import callback_allowed, check_url, require_identity
from shared.http.client import HttpLink
from shared.http.credentials import Principal, Revocations
from shared.http.metrics import ByteLedger, prometheus, resident_memory_bytes
from shared.http.service import TierSecurity
from shared.http.tickets import issue_ticket
from shared.model.sources import resolve_model
from shared.protocol.enums import Tier
from shared.protocol.links import link_emulator
from shared.protocol.messages import RoundPlan
from shared.runtime.copies import auto_copies
from shared.runtime.tier import TierRuntime, federation_state
from shared.seeds import derive_seed

log = logging.getLogger("splitllm.cloud")


class EdgeIn(BaseModel):
    """``POST /v1/edges``: an edge registering with the cloud."""

    edge_id: Ident
    model: str | None = Field(None, max_length=2048, description="the model deployment it serves (default: the first)")
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_url)]
    link_profile: str = Field("none", description="the edge's link profile; starts sent to it are delayed by it")
    link_rate_shaped: bool = Field(False, description="the network shapes the edge's link rates: emulate delay and loss only")


class RevokeIn(BaseModel):
    """``POST /v1/credentials/revoke``: one credential (its ``jti``), or every credential of a subject issued so far."""

    jti: str | None = Field(None, min_length=1, max_length=64)
    subject: str | None = Field(None, pattern=r"^(admin|cloud|edge|user):[A-Za-z0-9_.:-]{1,128}$",
                                description="role:id, e.g. user:user-3")


class CloudService:
    """Everything the routes touch; the routes themselves do no torch math."""

    def __init__(self, settings: CloudSettings, security: TierSecurity, revocations: Revocations) -> None:
        self.settings, self.security, self.revocations = settings, security, revocations
        self.federation = federation_from(settings)
        self.experiment = self.federation.primary.primary  # the default deployment's first task
        self.sources = {name: resolve_model(d.spec.model) for name, d in self.federation.deployments.items()}
        runtimes = {name: TierRuntime(Tier.CLOUD, self.sources[name], d.spec, device=settings.device,
                                      tasks={t: e.spec for t, e in d.experiments.items()}, autocast=settings.autocast,
                                      copies=settings.block_copies or auto_copies(settings.device, settings.threads))
                    for name, d in self.federation.deployments.items()}
        self.runtime = runtimes[self.federation.primary.name]
        initial = federation_state(self.federation, self.sources, settings.seed)
        self.store = Store(settings.data_dir)
        revocations.merge(self.store.get_setting("revocations") or {})
        self.store.put_setting("experiment", self.experiment.to_meta())  # what `splitllm export` reads offline
        self.ledger = ByteLedger()
        self.coordinator = Coordinator(runtimes if self.federation.namespaced else self.runtime, initial,
                                       seed=settings.seed, round_timeout=settings.round_timeout, store=self.store,
                                       ledger=self.ledger)
        self.coordinator.start_security = self.start_security
        self.edge_links: dict[str, dict[str, Any]] = {}  # edge id -> its link_profile, link_rate_shaped
        self._client_sizes: dict[tuple[str, str], list[int]] = {}  # (deployment, task) -> its clients' sizes
        self._device_bytes: dict[tuple[str, str], tuple[int, list[int]]] = {}
        self._restore_topology()
        self.queue: queue.Queue[RoundRecord | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="rounds", daemon=True)
        self.worker.start()
        self.counters = {"steps": 0, "updates": 0}

    def start_security(self, plans: list[RoundPlan], edge_id: str, lifetime: float) -> dict[str, Any]:
        """What an edge's start carries for its security: the revoked credentials (none: nothing said), and for each
        user the cloud's ticket for this start, which the user checks (its edge cannot make one), valid as long as
        the cloud waits for this phase's reports."""
        revoked = self.revocations.to_meta()
        credential = self.security.identity.credential
        tickets = None if credential is None else {p.user_id: issue_ticket(credential, p, edge_id, lifetime)
                                                   for p in plans}
        return {"revoked": revoked if any(revoked.values()) else None, "tickets": tickets}

    def edge_link(self, edge_id: str, url: str, link_profile: str = "none", link_rate_shaped: bool = False) -> HttpLink:
        return HttpLink(url, upward=False, timeout=self.settings.request_timeout,
                        max_message_bytes=self.settings.max_message_bytes, ledger=self.ledger,
                        identity=self.security.identity, audience=f"edge:{edge_id}",
                        emulator=link_emulator(link_profile, derive_seed(url, "down"), rate_shaped=link_rate_shaped))

    def register_edge(self, body: EdgeIn, caller: Principal | None) -> dict[str, Any]:
        """An edge (re-)registering itself: only with its own credential, at an allowed callback URL."""
        require_identity(caller, body.edge_id, "edge")
        refused = callback_allowed(body.url, self.settings.callback_hosts)
        if refused:
            raise InvalidInput(f"callback URL refused: {refused}")
        deployment = self.federation.deployment(body.model)  # an unknown model: 422, naming what is served
        try:
            link = self.edge_link(body.edge_id, body.url, body.link_profile, body.link_rate_shaped)
        except ValueError as exc:  # an unknown link profile
            raise InvalidInput(str(exc)) from None
        old = self.coordinator.edges.get(body.edge_id)
        self.edge_links[body.edge_id] = {"link_profile": body.link_profile, "link_rate_shaped": body.link_rate_shaped}
        self.coordinator.register_edge(body.edge_id, link, deployment.name if self.federation.namespaced else None)
        if old is not None:
            old.close()
        self.save_topology()
        log.info("edge %s registered at %s for %s", body.edge_id, body.url, deployment.name)
        return {**deployment.primary.to_meta(), "deployment": deployment.to_meta(), "revoked": self.revocations.to_meta()}

    def deployment_of_edge(self, edge_id: str) -> Deployment:
        name = self.coordinator.edge_deployment.get(edge_id)
        return self.federation.deployments.get(name or "", self.federation.primary)

    def register_user(self, edge_id: str, body: UserIn, caller: Principal | None) -> dict[str, Any]:
        """A user behind ``edge_id``: the edge's own call, with the user's signed registration as proof. The user's
        model must be its edge's, its task one the model trains (422 otherwise, naming what the cloud serves); the
        reply is the placement the cloud assigns it (``shared.config.placement``)."""
        require_identity(caller, edge_id, "edge")
        user = check_registration(self.security.verifier, edge_id, body) if self.security.verifier is not None else None
        if edge_id not in self.coordinator.edges:
            raise NotFound(f"unknown edge '{edge_id}'")
        deployment = self.deployment_of_edge(edge_id)
        if body.model is not None and body.model not in (deployment.name, deployment.spec.model):
            raise InvalidInput(f"edge '{edge_id}' serves model {deployment.name}, not '{body.model[:80]}'; this cloud "
                               f"serves {self.federation.served()}")
        bound = user.data if user is not None else None
        if bound is not None and body.data not in (None, bound):
            raise InvalidInput(f"the user's credential binds it to task '{bound}', not '{body.data[:64]}'")
        experiment = deployment.experiment(body.data or bound)  # an unknown task: 422, naming those served
        key = (deployment.name, experiment.data.name)
        if body.memory_budget is not None and key not in self._device_bytes:
            self._device_bytes[key] = device_bytes(self.sources[deployment.name], experiment.spec)
        task = experiment.data.name if len(deployment.experiments) > 1 else None
        placement = assign(body.declared(), experiment.spec, self._device_bytes.get(key), task)
        self.coordinator.register_user(edge_id, body.user_id, self.weight_of(body.num_samples, user, key), placement)
        self.save_topology()
        cut = experiment.spec.split[0] if placement.cut is None else placement.cut
        return {**placement.to_meta(), "cut": cut, "rank": placement.rank or experiment.spec.lora.rank,
                "data": experiment.data.name}

    def weight_of(self, reported: int, user: Principal | None, task: tuple[str, str]) -> int:
        """A user's weight in every aggregate: the size of the data partition of its task that its credential assigns
        it, else what it reports, capped at ``max_samples_per_user`` (default: the task's largest partition)."""
        sizes = self.client_sizes(task)
        if user is not None and user.client is not None:
            if not 0 <= user.client < len(sizes):
                raise InvalidInput(f"the user's credential names data client {user.client}; task {task[1]} has "
                                   f"{len(sizes)}")
            return sizes[user.client]
        cap = self.settings.max_samples_per_user or max(sizes, default=reported)
        return min(reported, cap)

    def client_sizes(self, task: tuple[str, str]) -> list[int]:
        """The training examples of each data client of a (deployment, task) (loaded once)."""
        if task not in self._client_sizes:
            data = self.federation.deployments[task[0]].experiment(task[1]).data
            self._client_sizes[task] = [len(c.train) for c in data.load().clients]
        return self._client_sizes[task]

    def revoke(self, body: RevokeIn) -> dict[str, Any]:
        """Revoke a credential (or a subject's), durably; edges learn of it with their next round's start."""
        if not body.jti and not body.subject:
            raise InvalidInput("give the jti of a credential or a subject (role:id) to revoke")
        self.revocations.add(jti=body.jti, subject=body.subject)
        self.store.put_setting("revocations", self.revocations.to_meta())
        return self.revocations.to_meta()

    def _restore_topology(self) -> None:
        """A restarted cloud calls the edges and users it knew; they need not register again."""
        topology = self.store.get_setting("topology") or {}
        for edge_id, entry in topology.items():
            self.edge_links[edge_id] = {"link_profile": entry.get("link_profile", "none"),
                                        "link_rate_shaped": bool(entry.get("link_rate_shaped", False))}
            self.coordinator.register_edge(edge_id, self.edge_link(edge_id, entry["url"], **self.edge_links[edge_id]),
                                           entry.get("deployment"))
            placements = entry.get("placements", {})
            for user_id, n in entry["users"].items():
                self.coordinator.register_user(edge_id, user_id, n, Placement.from_meta(placements.get(user_id)))

    def save_topology(self) -> None:
        c = self.coordinator
        self.store.put_setting("topology", {e: {"url": c.edges[e].base_url, "users": dict(c.edge_users[e]),
                                                "deployment": c.edge_deployment.get(e) or None,
                                                "placements": {u: c.placements[u].to_meta() for u in c.edge_users[e]},
                                                **self.edge_links.get(e, {})} for e in c.edges})

    def _work(self) -> None:
        while True:
            record = self.queue.get()
            if record is None:
                return
            if record.state == "cancelled":
                continue
            self.coordinator.run_round(record)
            log.info("round %s %s%s", record.round_id, record.state, f": {record.error}" if record.error else "")

    def close(self) -> None:
        """Cancel what runs, let the rounds thread finish, then close links and the store."""
        for record in list(self.coordinator.rounds.values()):
            if record.state in ("pending", "running", "aggregating"):
                self.coordinator.cancel(record.round_id)
        self.queue.put(None)
        self.worker.join(timeout=60)
        for link in self.coordinator.edges.values():
            link.close()
        with self.store.lock:
            self.store.close()

    def start_round(self, body: BaseModel | None) -> RoundRecord:
        """Queue a round: the body's fields over this cloud's defaults, checked before it is accepted."""
        record = self.coordinator.new_round(merge(body, self.settings))
        self.queue.put(record)
        return record

    def round_view(self, round_id: int) -> dict[str, Any] | None:
        record = self.coordinator.rounds.get(round_id)
        if record is None:
            return self.store.round(round_id)
        view = record.to_dict()
        if record.state == "running":  # live per-user step counts from the cloud's sessions
            for user in record.participants:
                session = self.runtime.sessions.get((round_id, user))
                if session is not None:
                    view["progress"][user] = f"{session.plan.mode} step {session.steps}/{session.plan.local_steps}"
        return view

    def metrics_text(self) -> str:
        rounds = self.store.rounds()
        by_state = {s: sum(1 for r in rounds if r["state"] == s) for s in ROUND_STATES}
        total = self.ledger.total.snapshot()
        return prometheus({
            "splitllm_rounds": ("gauge", "rounds by state", [({"state": s}, n) for s, n in by_state.items()]),
            "splitllm_adapter_version": ("gauge", "current committed adapter version", [({}, self.coordinator.version)]),
            "splitllm_registered_edges": ("gauge", "edges registered", [({}, len(self.coordinator.edges))]),
            "splitllm_registered_users": ("gauge", "users registered",
                                          [({}, sum(len(u) for u in self.coordinator.edge_users.values()))]),
            "splitllm_steps_total": ("counter", "forward/backward steps served", [({}, self.counters["steps"])]),
            "splitllm_updates_total": ("counter", "edge updates received", [({}, self.counters["updates"])]),
            "splitllm_bytes_total": ("counter", "bytes on the edge-cloud hop",
                                     [({"direction": "up"}, total["bytes_up"]), ({"direction": "down"}, total["bytes_down"])]),
            "splitllm_open_sessions": ("gauge", "cloud sessions held", [({}, len(self.runtime.sessions))]),
            "process_resident_memory_bytes": ("gauge", "resident memory", [({}, resident_memory_bytes())]),
        })

