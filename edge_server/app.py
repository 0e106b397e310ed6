"""The edge service: user registration, the step relay, round start and update endpoints, health and metrics."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import AfterValidator, BaseModel, Field

from edge_server.compute import EdgeServer
from shared.seeds import derive_seed
from shared.config.deployment import Experiment
from shared.protocol.links import LinkEmulator, get_profile
from shared.http.auth import Auth, check_url
from shared.http.server import guard
from shared.http.metrics import ByteLedger, prometheus, resident_memory_bytes
from shared.http.client import HttpLink, post_json
from shared.http.server import serve_message
from shared.model.sources import resolve_model
from shared.config.settings import EdgeSettings
from shared.runtime.tier import TierRuntime

log = logging.getLogger("splitllm.edge")


class UserIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_url)]
    num_samples: int = Field(ge=0)
    link_profile: str = Field("none", description="the user's link profile; starts sent to it are delayed by it")


class EdgeService:
    """Registers with the cloud (retrying until it answers), then loads the edge partition."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.edge_id = settings.ident()
        self.ledger = ByteLedger()
        self.experiment: Experiment | None = None
        self.server: EdgeServer | None = None
        self.error: str | None = None
        self.counters = {"steps": 0, "updates": 0}
        self.thread = threading.Thread(target=self._start, name="edge-start", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        s = self.settings
        try:
            profile = get_profile(s.link_profile)  # validate before registering
            meta = post_json(f"{s.cloud.rstrip('/')}/v1/edges",
                             {"edge_id": self.edge_id, "url": s.url(), "link_profile": s.link_profile}, deadline=3600,
                             token=s.token_value(), verify=s.ca_file or True)
            self.experiment = Experiment.from_meta(meta)
            runtime = TierRuntime("edge", resolve_model(self.experiment.spec.model), self.experiment.spec, device=s.device)
            cloud = HttpLink(s.cloud, upward=True, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                             token=s.token_value(), verify=s.ca_file or True,
                             emulator=LinkEmulator(profile, seed=derive_seed(self.edge_id, "link")) if profile else None)
            self.server = EdgeServer(self.edge_id, runtime, cloud, ledger=self.ledger, max_sessions=s.max_sessions)
            log.info("edge %s ready (blocks %s)", self.edge_id, runtime.partition.layer_ids)
        except Exception as exc:  # reported by /healthz; the process stays up to say why
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("edge start-up failed: %s", self.error)

    def ready(self) -> EdgeServer:
        if self.server is None:
            raise HTTPException(503, self.error or "the edge is starting (registering with the cloud, loading its blocks)",
                                headers={"Retry-After": "1"})
        return self.server

    def register_user(self, body: UserIn) -> None:
        server = self.ready()
        s = self.settings
        try:
            profile = get_profile(body.link_profile)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        emulator = LinkEmulator(profile, seed=derive_seed(body.user_id, "down")) if profile else None
        link = HttpLink(body.url, upward=False, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                        ledger=self.ledger, emulator=emulator, token=s.token_value(), verify=s.ca_file or True)
        try:  # the cloud learns of the user only once the edge can call it back
            post_json(f"{s.cloud.rstrip('/')}/v1/edges/{self.edge_id}/users",
                      {"user_id": body.user_id, "num_samples": body.num_samples}, deadline=60,
                      token=s.token_value(), verify=s.ca_file or True)
        except Exception:
            link.close()
            raise
        old = server.users.get(body.user_id)
        server.register_user(body.user_id, link, body.num_samples)
        if old is not None:
            old.close()


def create_app(settings: EdgeSettings) -> FastAPI:
    holder: dict[str, EdgeService] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder["svc"] = EdgeService(settings)
        yield
        holder.pop("svc")

    app = FastAPI(title="splitllm edge", version="0.1.0", lifespan=lifespan,
                  description="Relay for many users: the middle blocks, per-session replicas, hierarchical FedAvg.")

    guard(app, Auth(settings.token_value(), None, settings.insecure_dev))

    def svc() -> EdgeService:
        if "svc" not in holder:
            raise HTTPException(503, "the edge is starting", headers={"Retry-After": "1"})
        return holder["svc"]

    @app.get("/healthz")
    def healthz() -> Response:
        s = svc()
        ready = s.server is not None
        body = {"status": "ok" if ready else ("error" if s.error else "starting"), "tier": "edge", "edge_id": s.edge_id,
                "users": len(s.server.users) if ready else 0, "error": s.error}
        import json

        return Response(json.dumps(body), status_code=200 if ready else 503, media_type="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        s = svc()
        total = s.ledger.total.snapshot()
        sessions = len(s.server.runtime.sessions) if s.server else 0
        text = prometheus({
            "splitllm_ready": ("gauge", "1 once registered and loaded", [({}, int(s.server is not None))]),
            "splitllm_registered_users": ("gauge", "users registered", [({}, len(s.server.users) if s.server else 0)]),
            "splitllm_open_sessions": ("gauge", "edge sessions held", [({}, sessions)]),
            "splitllm_steps_total": ("counter", "steps relayed", [({}, s.counters["steps"])]),
            "splitllm_updates_total": ("counter", "user updates received", [({}, s.counters["updates"])]),
            "splitllm_bytes_total": ("counter", "bytes on the user-edge hop",
                                     [({"direction": "up"}, total["bytes_up"]), ({"direction": "down"}, total["bytes_down"])]),
            "process_resident_memory_bytes": ("gauge", "resident memory", [({}, resident_memory_bytes())]),
        })
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/spec")
    def spec() -> dict[str, Any]:
        s = svc()
        s.ready()
        return s.experiment.to_meta()

    @app.post("/v1/users")
    def register_user(body: UserIn) -> dict[str, Any]:
        svc().register_user(body)
        return {"ok": True, "edge_id": svc().edge_id}

    async def _msgpack(request: Request, endpoint: str) -> Response:
        s = svc()
        ledger = s.ledger if endpoint != "start" else None  # starts come from the cloud, which counts them
        resp = await serve_message(request, endpoint, getattr(s.ready(), f"on_{endpoint}"), s.settings, ledger)
        s.counters["steps" if endpoint == "step" else "updates"] += endpoint != "start"
        return resp

    @app.post("/v1/step")
    async def step(request: Request) -> Response:
        return await _msgpack(request, "step")

    @app.post("/v1/start")
    async def start(request: Request) -> Response:
        return await _msgpack(request, "start")

    @app.post("/v1/update")
    async def update(request: Request) -> Response:
        return await _msgpack(request, "update")

    return app
