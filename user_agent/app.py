"""The user's HTTP surface: the round start endpoint, status, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response

from shared.config.settings import UserSettings
from shared.http.auth import Auth
from shared.http.metrics import prometheus, resident_memory_bytes
from shared.http.server import msgpack_route, serve_message, service_app
from user_agent.service import UserService


def create_app(settings: UserSettings) -> FastAPI:
    app, svc = service_app("user agent", "A device: local data, embeddings and the first blocks, the local training loop.",
                           lambda: UserService(settings), Auth(settings.token_value(), None, settings.insecure_dev))

    @app.get("/healthz")
    def healthz() -> Response:
        s: UserService = svc()
        return s.health(user_id=s.user_id)

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        s: UserService = svc()
        agent = s.agent
        return {"user_id": s.user_id, "ready": agent is not None, "jobs": dict(agent.jobs) if agent else {},
                "last_error": agent.last_error if agent else None}

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
            "process_resident_memory_bytes": ("gauge", "resident memory", [({}, resident_memory_bytes())]),
        })
        return Response(text, media_type="text/plain; version=0.0.4")

    async def start(request: Request, endpoint: str) -> Response:
        s: UserService = svc()
        return await serve_message(request, s.ready().on_start, s.settings, status_code=202)

    msgpack_route(app, "start", start, status_code=202)
    return app
