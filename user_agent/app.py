"""The user's HTTP surface: the round start endpoint, status, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response

from shared.config.settings import UserSettings
from shared.errors import Forbidden
from shared.http.auth import Auth, rule
from shared.http.credentials import Principal
from shared.http.metrics import prometheus, resident_memory_bytes
from shared.http.server import msgpack_route, serve_message, service_app
from shared.http.service import tier_security
from shared.protocol.wire import Message
from user_agent.service import UserService


# Who may call what: the user's edge starts its rounds; the edge or an admin may read its status.
RULES = (
    rule("POST", "/v1/start", "edge"),
    rule("GET", "/v1/status", "edge", "admin"),
)


def create_app(settings: UserSettings) -> FastAPI:
    security = tier_security(settings, "user")
    principal = security.principal
    user_id = principal.id if principal else settings.ident()
    client_index = principal.client if principal and principal.client is not None else settings.client_index
    for name, value, given in (("user_id", user_id, settings.user_id), ("client_index", client_index, settings.client_index)):
        if name in settings.model_fields_set and given != value:
            raise ValueError(f"--{name.replace('_', '-')} {given} differs from what this user's credential names ({value})")
    auth = Auth(security.verifier, {f"user:{user_id}"}, RULES, settings.insecure_dev, settings.token_value())
    app, svc = service_app("user agent", "A device: local data, embeddings and the first blocks, the local training loop.",
                           lambda: UserService(settings, security, user_id, client_index), auth)

    def from_its_edge(msg: Message, caller: Principal) -> None:
        """Only the edge this user registered with may start it, and only with the cloud's ticket for that start."""
        s: UserService = svc()
        if caller.id != s.edge_id:
            raise Forbidden(f"edge '{caller.id}' is not this user's edge ('{s.edge_id}')")
        s.check_start(msg, caller.id)

    @app.get("/healthz")
    def healthz() -> Response:
        s: UserService = svc()
        return s.health(user_id=s.user_id)

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        s: UserService = svc()
        agent = s.agent
        return {"user_id": s.user_id, "ready": agent is not None, "jobs": dict(agent.jobs) if agent else {},
                "last_error": agent.last_error if agent else None, "placement": s.placement,
                "blocks": list(agent.runtime.partition.layer_ids) if agent else [],
                "edge": s.edge_contact.snapshot(), "refused_start": s.refused_start}

    @app.get("/metrics")
    def metrics() -> Response:
        s: UserService = svc()
        jobs = s.agent.jobs if s.agent else {}
        stats = s.agent.edge.stats.snapshot() if s.agent else {"bytes_up": 0, "bytes_down": 0}
        text = prometheus({
            "splitllm_ready": ("gauge", "1 once registered and loaded", [({}, int(s.agent is not None))]),
            "splitllm_jobs": ("gauge", "round jobs by state",
                              [({"state": st}, sum(1 for v in jobs.values() if v == st)) for st in ("running", "reported", "failed")]),
            "splitllm_bytes_total": ("counter", "bytes to and from the edge",
                                     [({"direction": "up"}, stats["bytes_up"]), ({"direction": "down"}, stats["bytes_down"])]),
            "splitllm_refused_starts_total": ("counter", "starts refused without the cloud's ticket for them",
                                              [({}, s.refused_starts)]),
            "process_resident_memory_bytes": ("gauge", "resident memory", [({}, resident_memory_bytes())]),
        })
        return Response(text, media_type="text/plain; version=0.0.4")

    async def start(request: Request, endpoint: str) -> Response:
        s: UserService = svc()
        return await serve_message(request, s.ready().on_start, s.settings, status_code=202, authorize=from_its_edge)

    msgpack_route(app, "start", start, status_code=202)
    return app
