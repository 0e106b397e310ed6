"""The cloud service: the round API, registration, the step and update endpoints, health and metrics."""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Request, Response
from pydantic import AfterValidator, BaseModel, Field

from cloud_server.rounds import MAX_DEADLINE, ROUND_STATES, Coordinator, RoundRecord, RoundRequest
from cloud_server.store import Store
from shared.model.adapters import LoraSettings, initial_state
from shared.fl import default_lr
from shared.config.deployment import DataSpec, Experiment, codecs_for
from shared.seeds import derive_seed
from shared.protocol.links import LinkEmulator, get_profile
from shared.http.auth import Auth, check_url
from shared.http.server import guard
from shared.http.metrics import ByteLedger, prometheus, resident_memory_bytes
from shared.http.client import HttpLink
from shared.http.server import serve_message
from shared.model.sources import resolve_model
from shared.model.partition import Split
from shared.config.settings import CloudSettings
from shared.config.model_spec import ModelSpec
from shared.runtime.tier import TierRuntime, adapter_shapes

log = logging.getLogger("splitllm.cloud")


Id = Annotated[int, Path(ge=0, le=2**63 - 1)]  # SQLite's integers


class RoundIn(BaseModel):
    """``POST /v1/rounds``: every field has a default, so ``{}`` starts a round with the configured ones."""

    participants: list[str] | None = Field(None, description="user ids to train (default: all registered)")
    fraction: float | None = Field(None, gt=0, le=1, description="or a random fraction of the registered users")
    local_steps: int | None = Field(None, ge=1, le=100_000)
    batch_size: int | None = Field(None, ge=1, le=4096)
    lr: float | None = Field(None, gt=0, le=10)
    algorithm: str = "fedavg"
    config: dict[str, Any] = Field(default_factory=dict, description="the algorithm's options")
    evaluate: bool = True
    deadline: float | None = Field(None, gt=0, le=MAX_DEADLINE,
                                   description="seconds before silent users are dropped (default: setting)")
    min_participants: int | None = Field(None, ge=1, description="users that must report to commit (default: setting)")
    clip_norm: float | None = Field(None, gt=0, description="clip each update's change to this L2 norm")


class EdgeIn(BaseModel):
    edge_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_url)]
    link_profile: str = Field("none", description="the edge's link profile; starts sent to it are delayed by it")


class UserIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    num_samples: int = Field(ge=0)


def _round_api_write(method: str, path: str) -> bool:
    """The admin token's routes: starting and cancelling rounds."""
    return method == "POST" and (path.rstrip("/") == "/v1/rounds" or path.endswith("/cancel"))


def build_experiment(settings: CloudSettings) -> Experiment:
    data = DataSpec(name=settings.data, num_clients=settings.num_clients, partition=settings.partition,
                    alpha=settings.dirichlet_alpha, seed=settings.seed, max_len=settings.max_len,
                    min_chars=settings.min_chars, pad_to_max=settings.pad_to_max,
                    max_examples_per_client=settings.max_examples_per_client,
                    eval_examples_per_client=settings.eval_examples_per_client)
    task, num_labels = data.task_and_labels()
    source = resolve_model(settings.model)
    split = Split.parse(settings.split, source.num_layers)
    lora = LoraSettings(rank=settings.rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                        target_modules=list(settings.target_modules))
    spec = ModelSpec(model=settings.model, split=(split.a, split.b), task=task,
                     num_labels=num_labels if task == "cls" else 0, lora=lora, seed=settings.seed,
                     adapter=settings.adapter, codecs=codecs_for(settings.user_edge_codecs, settings.edge_cloud_codecs))
    return Experiment(spec=spec, data=data)


class CloudService:
    """Everything the routes touch; the routes themselves do no torch math."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.experiment = build_experiment(settings)
        spec = self.experiment.spec
        source = resolve_model(spec.model)
        self.runtime = TierRuntime("cloud", source, spec, device=settings.device)
        shapes = adapter_shapes(source, spec)
        initial = {tier: initial_state(shapes[tier], spec.seed, kind=spec.adapter) for tier in shapes}
        self.store = Store(settings.data_dir)
        self.ledger = ByteLedger()
        self.coordinator = Coordinator(self.runtime, initial, seed=spec.seed, round_timeout=settings.round_timeout,
                                       store=self.store, ledger=self.ledger)
        self.edge_profiles: dict[str, str] = {}
        self._restore_topology()
        self.queue: queue.Queue[RoundRecord | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="rounds", daemon=True)
        self.worker.start()
        self.counters = {"steps": 0, "updates": 0}

    def edge_link(self, url: str, link_profile: str = "none") -> HttpLink:
        profile = get_profile(link_profile)
        return HttpLink(url, upward=False, timeout=self.settings.request_timeout,
                        max_message_bytes=self.settings.max_message_bytes, ledger=self.ledger,
                        token=self.settings.token_value(), verify=self.settings.ca_file or True,
                        emulator=LinkEmulator(profile, seed=derive_seed(url, "down")) if profile else None)

    def _restore_topology(self) -> None:
        """A restarted cloud calls the edges and users it knew; they need not register again."""
        topology = self.store.get_setting("topology") or {}
        for edge_id, entry in topology.items():
            self.edge_profiles[edge_id] = entry.get("link_profile", "none")
            self.coordinator.register_edge(edge_id, self.edge_link(entry["url"], self.edge_profiles[edge_id]))
            for user_id, n in entry["users"].items():
                self.coordinator.register_user(edge_id, user_id, n)

    def save_topology(self) -> None:
        c = self.coordinator
        self.store.put_setting("topology", {e: {"url": c.edges[e].base_url, "users": dict(c.edge_users[e]),
                                                "link_profile": self.edge_profiles.get(e, "none")} for e in c.edges})

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

    def request_from(self, body: RoundIn) -> RoundRequest:
        s = self.settings
        lr = body.lr or s.lr or default_lr(self.experiment.spec.task)
        return RoundRequest(participants=body.participants, fraction=body.fraction,
                            local_steps=body.local_steps or s.local_steps, batch_size=body.batch_size or s.batch_size,
                            lr=lr, algorithm=body.algorithm, config=body.config, evaluate=body.evaluate,
                            deadline=body.deadline or s.user_deadline,
                            min_participants=body.min_participants or s.min_participants,
                            clip_norm=body.clip_norm or s.clip_update_norm)

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


def create_app(settings: CloudSettings) -> FastAPI:
    """The cloud's FastAPI app; the model loads at start-up (lifespan), so ``/healthz`` answers once ready."""
    holder: dict[str, CloudService] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder["svc"] = CloudService(settings)
        app.state.service = holder["svc"]
        yield
        holder.pop("svc").close()

    app = FastAPI(title="splitllm cloud", version="0.1.0", lifespan=lifespan,
                  description="Coordinator of a user / edge / cloud split LoRA fine-tuning deployment.")

    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    guard(app, Auth(settings.token_value(), admin_token, settings.insecure_dev), is_admin=_round_api_write)

    def svc() -> CloudService:
        if "svc" not in holder:
            raise HTTPException(503, "the cloud is starting")
        return holder["svc"]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        s = svc()
        return {"status": "ok", "tier": "cloud", "version": s.coordinator.version,
                "edges": len(s.coordinator.edges), "users": sum(len(u) for u in s.coordinator.edge_users.values())}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(svc().metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/spec")
    def spec() -> dict[str, Any]:
        return svc().experiment.to_meta()

    @app.post("/v1/edges")
    def register_edge(body: EdgeIn) -> dict[str, Any]:
        s = svc()
        try:
            link = s.edge_link(body.url, body.link_profile)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        old = s.coordinator.edges.get(body.edge_id)
        s.edge_profiles[body.edge_id] = body.link_profile
        s.coordinator.register_edge(body.edge_id, link)
        if old is not None:
            old.close()
        s.save_topology()
        log.info("edge %s registered at %s", body.edge_id, body.url)
        return s.experiment.to_meta()

    @app.post("/v1/edges/{edge_id}/users")
    def register_user(edge_id: str, body: UserIn) -> dict[str, Any]:
        try:
            svc().coordinator.register_user(edge_id, body.user_id, body.num_samples)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        svc().save_topology()
        return {"ok": True}

    async def _msgpack(request: Request, endpoint: str) -> Response:
        s = svc()
        resp = await serve_message(request, endpoint, getattr(s.coordinator, f"on_{endpoint}"), s.settings, s.ledger)
        s.counters["steps" if endpoint == "step" else "updates"] += 1
        return resp

    @app.post("/v1/step")
    async def step(request: Request) -> Response:
        return await _msgpack(request, "step")

    @app.post("/v1/update")
    async def update(request: Request) -> Response:
        return await _msgpack(request, "update")

    @app.post("/v1/rounds", status_code=202)
    def start_round(body: RoundIn | None = None) -> dict[str, Any]:
        s = svc()
        try:  # new_round validates the request and the algorithm's config
            record = s.coordinator.new_round(s.request_from(body or RoundIn()))
        except (ValueError, TypeError) as exc:
            raise HTTPException(422, str(exc)) from None
        s.queue.put(record)
        return {"round_id": record.round_id, "state": record.state, "base_version": record.base_version}

    @app.get("/v1/rounds")
    def list_rounds() -> dict[str, Any]:
        s = svc()
        stored = {r["round_id"]: r for r in s.store.rounds()}
        stored.update({rid: r.to_dict() for rid, r in s.coordinator.rounds.items()})
        return {"version": s.coordinator.version, "rounds": [stored[k] for k in sorted(stored)]}

    @app.get("/v1/rounds/{round_id}")
    def get_round(round_id: Id) -> dict[str, Any]:
        view = svc().round_view(round_id)
        if view is None:
            raise HTTPException(404, f"no round {round_id}")
        return view

    @app.post("/v1/rounds/{round_id}/cancel")
    def cancel_round(round_id: Id) -> dict[str, Any]:
        s = svc()
        try:
            return s.coordinator.cancel(round_id).to_dict()
        except KeyError:
            if s.store.round(round_id) is None:
                raise HTTPException(404, f"no round {round_id}") from None
            raise HTTPException(409, f"round {round_id} finished before this cloud process started") from None

    @app.get("/v1/adapters/{version}")
    def adapters(version: Id) -> Response:
        try:
            data = svc().store.version_bytes(version)
        except KeyError:
            raise HTTPException(404, f"no adapter version {version}") from None
        return Response(data, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="adapters-v{version}.safetensors"'})

    return app

