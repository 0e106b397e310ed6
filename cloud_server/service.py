"""The cloud as a service: the deployment it fixes, its store, the coordinator, the rounds queue."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import threading
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from cloud_server.records import ROUND_STATES, RoundRecord
from cloud_server.rounds import Coordinator
from cloud_server.store import Store
from shared.config.deployment import DataSpec, Experiment, ModelSpec, codecs_for
from shared.config.round import merge
from shared.config.settings import CloudSettings
from shared.errors import InvalidInput
from shared.http.auth import callback_allowed, check_url, require_identity
from shared.http.client import HttpLink
from shared.http.credentials import CredentialError, Principal, Revocations
from shared.http.metrics import ByteLedger, prometheus, resident_memory_bytes
from shared.http.service import TierSecurity
from shared.model.adapters import LoraSettings, initial_state
from shared.model.partition import Split
from shared.model.sources import resolve_model
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from shared.protocol.links import link_emulator
from shared.runtime.tier import TierRuntime, adapter_shapes
from shared.seeds import derive_seed

log = logging.getLogger("splitllm.cloud")

Ident = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class EdgeIn(BaseModel):
    """``POST /v1/edges``: an edge registering with the cloud."""

    edge_id: Ident
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_url)]
    link_profile: str = Field("none", description="the edge's link profile; starts sent to it are delayed by it")
    link_rate_shaped: bool = Field(False, description="the network shapes the edge's link rates: emulate delay and loss only")


class SignedRequest(BaseModel):
    """A request as its sender signed it: the signature headers and the body (base64), forwarded as proof."""

    headers: dict[str, str] = Field(max_length=8)
    body: str = Field(max_length=1 << 16)


class UserIn(BaseModel):
    """``POST /v1/edges/{edge_id}/users``: an edge telling the cloud of a user it registered.

    ``registration`` is the user's own signed registration request to that edge: proof that the user
    (not only its edge) asked to be registered there. Required outside development mode.
    """

    user_id: Ident
    num_samples: int = Field(ge=0)
    registration: SignedRequest | None = None


class RevokeIn(BaseModel):
    """``POST /v1/credentials/revoke``: one credential (its ``jti``), or every credential of a subject issued so far."""

    jti: str | None = Field(None, min_length=1, max_length=64)
    subject: str | None = Field(None, pattern=r"^(admin|cloud|edge|user):[A-Za-z0-9_.:-]{1,128}$",
                                description="role:id, e.g. user:user-3")


def build_experiment(settings: CloudSettings) -> Experiment:
    data = DataSpec(name=settings.data, num_clients=settings.num_clients, partition=settings.partition,
                    alpha=settings.dirichlet_alpha, seed=settings.seed, max_len=settings.max_len,
                    min_chars=settings.min_chars, pad_to_max=settings.pad_to_max,
                    max_examples_per_client=settings.max_examples_per_client,
                    eval_examples_per_client=settings.eval_examples_per_client)
    task, num_labels = data.task_and_labels()
    source = resolve_model(settings.model)
    source.family.require(task)  # refused here, in one line: a model without a head for the data's task,
    source.tokenizer(settings.tokenizer)  # or without a usable tokenizer
    split = Split.parse(settings.split, source.num_layers)
    lora = LoraSettings(rank=settings.rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                        target_modules=list(settings.target_modules))
    spec = ModelSpec(model=settings.model, split=(split.a, split.b), task=task,
                     num_labels=num_labels if task == "cls" else 0, lora=lora, seed=settings.seed,
                     adapter=settings.adapter, codecs=codecs_for(settings.user_edge_codecs, settings.edge_cloud_codecs),
                     u_shaped=settings.u_shaped, tokenizer=settings.tokenizer)
    return Experiment(spec=spec, data=data)


class CloudService:
    """Everything the routes touch; the routes themselves do no torch math."""

    def __init__(self, settings: CloudSettings, security: TierSecurity, revocations: Revocations) -> None:
        self.settings, self.security, self.revocations = settings, security, revocations
        self.experiment = build_experiment(settings)
        spec = self.experiment.spec
        source = resolve_model(spec.model)
        self.runtime = TierRuntime(Tier.CLOUD, source, spec, device=settings.device)
        shapes = adapter_shapes(source, spec)
        initial = AdapterBundle({tier: initial_state(shapes[tier], spec.seed, kind=spec.adapter) for tier in shapes})
        self.store = Store(settings.data_dir)
        revocations.merge(self.store.get_setting("revocations") or {})
        self.store.put_setting("experiment", self.experiment.to_meta())  # what `splitllm export` reads offline
        self.ledger = ByteLedger()
        self.coordinator = Coordinator(self.runtime, initial, seed=spec.seed, round_timeout=settings.round_timeout,
                                       store=self.store, ledger=self.ledger)
        self.coordinator.revoked = revocations.to_meta
        self.edge_links: dict[str, dict[str, Any]] = {}  # edge id -> its link_profile, link_rate_shaped
        self._client_sizes: list[int] | None = None
        self._restore_topology()
        self.queue: queue.Queue[RoundRecord | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="rounds", daemon=True)
        self.worker.start()
        self.counters = {"steps": 0, "updates": 0}

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
        try:
            link = self.edge_link(body.edge_id, body.url, body.link_profile, body.link_rate_shaped)
        except ValueError as exc:  # an unknown link profile
            raise InvalidInput(str(exc)) from None
        old = self.coordinator.edges.get(body.edge_id)
        self.edge_links[body.edge_id] = {"link_profile": body.link_profile, "link_rate_shaped": body.link_rate_shaped}
        self.coordinator.register_edge(body.edge_id, link)
        if old is not None:
            old.close()
        self.save_topology()
        log.info("edge %s registered at %s", body.edge_id, body.url)
        return {**self.experiment.to_meta(), "revoked": self.revocations.to_meta()}

    def register_user(self, edge_id: str, body: UserIn, caller: Principal | None) -> None:
        """A user behind ``edge_id``: the edge's own call, with the user's signed registration as proof."""
        require_identity(caller, edge_id, "edge")
        user = self.check_registration(edge_id, body) if self.security.verifier is not None else None
        self.coordinator.register_user(edge_id, body.user_id, self.weight_of(body.num_samples, user))
        self.save_topology()

    def weight_of(self, reported: int, user: Principal | None) -> int:
        """A user's weight in every aggregate: the size of the data partition its credential assigns it, else what
        it reports, capped at ``max_samples_per_user`` (default: the deployment's largest partition)."""
        sizes = self.client_sizes()
        if user is not None and user.client is not None:
            if not 0 <= user.client < len(sizes):
                raise InvalidInput(f"the user's credential names data client {user.client}; the deployment has "
                                   f"{len(sizes)}")
            return sizes[user.client]
        cap = self.settings.max_samples_per_user or max(sizes, default=reported)
        return min(reported, cap)

    def client_sizes(self) -> list[int]:
        """The training examples of each data client the deployment partitions (loaded once)."""
        if self._client_sizes is None:
            self._client_sizes = [len(c.train) for c in self.experiment.data.load().clients]
        return self._client_sizes

    def check_registration(self, edge_id: str, body: UserIn) -> Principal:
        """The user signed a registration for this edge, recently, with this id and sample count."""
        proof, verifier = body.registration, self.security.verifier
        if proof is None or verifier is None:
            raise InvalidInput("a user's registration needs its signed request to its edge (registration)")
        try:
            raw = base64.b64decode(proof.body, validate=True)
            user, digest = verifier.request(proof.headers, "POST", "/v1/users", {f"edge:{edge_id}"})
            signed = json.loads(raw)
        except (CredentialError, ValueError) as exc:
            raise InvalidInput(f"the user's registration does not verify: {exc}") from None
        if hashlib.sha256(raw).hexdigest() != digest or user.role != "user":
            raise InvalidInput("the user's registration does not verify: not the body the user signed")
        if not isinstance(signed, dict) or signed.get("user_id") != body.user_id or user.id != body.user_id \
                or signed.get("num_samples") != body.num_samples:
            raise InvalidInput("the registration the user signed is for another user id or sample count")
        return user

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
            self.coordinator.register_edge(edge_id, self.edge_link(edge_id, entry["url"], **self.edge_links[edge_id]))
            for user_id, n in entry["users"].items():
                self.coordinator.register_user(edge_id, user_id, n)

    def save_topology(self) -> None:
        c = self.coordinator
        self.store.put_setting("topology", {e: {"url": c.edges[e].base_url, "users": dict(c.edge_users[e]),
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

