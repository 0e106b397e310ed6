"""The edge's HTTP surface: user registration, the step relay, round start and update endpoints, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response

from edge_server.service import EdgeService, UserIn
from shared.config.settings import EdgeSettings
from shared.http.auth import Auth
from shared.http.metrics import prometheus, resident_memory_bytes
from shared.http.server import msgpack_route, serve_message, service_app


def create_app(settings: EdgeSettings) -> FastAPI:
    app, svc = service_app("edge", "Relay for many users: the middle blocks, per-session replicas, hierarchical FedAvg.",
                           lambda: EdgeService(settings), Auth(settings.token_value(), None, settings.insecure_dev))

    @app.get("/healthz")
    def healthz() -> Response:
        s: EdgeService = svc()
        return s.health(edge_id=s.edge_id, users=len(s.server.users) if s.server else 0)

    @app.get("/metrics")
    def metrics() -> Response:
        s: EdgeService = svc()
        total = s.ledger.total.snapshot()
        text = prometheus({
            "splitllm_ready": ("gauge", "1 once registered and loaded", [({}, int(s.server is not None))]),
            "splitllm_registered_users": ("gauge", "users registered", [({}, len(s.server.users) if s.server else 0)]),
            "splitllm_open_sessions": ("gauge", "edge sessions held",
                                       [({}, len(s.server.runtime.sessions) if s.server else 0)]),
            "splitllm_steps_total": ("counter", "steps relayed", [({}, s.counters["steps"])]),
            "splitllm_updates_total": ("counter", "user updates received", [({}, s.counters["updates"])]),
            "splitllm_bytes_total": ("counter", "bytes on the user-edge hop",
                                     [({"direction": "up"}, total["bytes_up"]), ({"direction": "down"}, total["bytes_down"])]),
            "process_resident_memory_bytes": ("gauge", "resident memory", [({}, resident_memory_bytes())]),
        })
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/spec")
    def spec() -> dict[str, Any]:
        s: EdgeService = svc()
        s.ready()
        return s.experiment.to_meta()

    @app.post("/v1/users")
    def register_user(body: UserIn) -> dict[str, Any]:
        s: EdgeService = svc()
        s.register_user(body)
        return {"ok": True, "edge_id": s.edge_id}

    async def serve(request: Request, endpoint: str) -> Response:
        s: EdgeService = svc()
        ledger = s.ledger if endpoint != "start" else None  # starts come from the cloud, which counts them
        server = s.ready()
        resp = await serve_message(request, getattr(server, f"on_{endpoint}"), s.settings, ledger,
                                   after=getattr(server, f"after_{endpoint}", None))
        if endpoint != "start":
            s.counters["steps" if endpoint == "step" else "updates"] += 1
        return resp

    for endpoint in ("step", "start", "update"):
        msgpack_route(app, endpoint, serve)
    return app
