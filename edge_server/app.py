"""The edge's HTTP surface: user registration, the step relay, round start and update endpoints, health and metrics."""

from __future__ import annotations

import base64
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response

from edge_server.service import EdgeService, UserIn
from shared.config.settings import EdgeSettings
from shared.errors import Forbidden, NotFound
from shared.http.auth import Auth, principal_of, require_identity, rule
from shared.http.credentials import CERT_HEADER, SIGNATURE_HEADER, SIGNED_HEADER, Principal, Revocations
from shared.http.metrics import prometheus, resident_memory_bytes
from shared.http.server import msgpack_route, serve_message, service_app
from shared.http.service import tier_security
from shared.protocol.wire import Message

# Who may call what: users register, step and report; the cloud starts rounds.
RULES = (
    rule("GET", "/v1/spec", "user", "admin"),
    rule("POST", "/v1/users", "user"),
    rule("GET", "/v1/users/[^/]+", "user", "admin"),
    rule("POST", "/v1/(step|backward|update)", "user"),
    rule("POST", "/v1/start", "cloud"),
)


def own_messages(msg: Message, caller: Principal) -> None:
    """A user steps and reports only as itself: another user's session or round is not its to touch."""
    if msg.meta.get("user") != caller.id:
        raise Forbidden(f"user '{caller.id}' may not act for user '{str(msg.meta.get('user'))[:64]}'")


def create_app(settings: EdgeSettings) -> FastAPI:
    revocations = Revocations()
    security = tier_security(settings, "edge", revocations)
    edge_id = security.principal.id if security.principal else settings.ident()
    if settings.edge_id and settings.edge_id != edge_id:
        raise ValueError(f"--edge-id {settings.edge_id} differs from the id its credential names ({edge_id})")
    # "edge" alone is what a user signs for before it knows this edge's id (only GET /v1/spec needs it)
    auth = Auth(security.verifier, {f"edge:{edge_id}"}, RULES, settings.insecure_dev, settings.token_value(),
                route_audiences=[("edge", rule("GET", "/v1/spec", "user", "admin"))])  # before a user knows the id
    app, svc = service_app("edge", "Relay for many users: the middle blocks, per-session replicas, hierarchical FedAvg.",
                           lambda: EdgeService(settings, security, edge_id, revocations), auth)

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
        return {**s.experiment.to_meta(), "deployment": s.deployment.to_meta(), "edge_id": s.edge_id}

    @app.post("/v1/users")
    async def register_user(body: UserIn, request: Request) -> dict[str, Any]:
        s: EdgeService = svc()
        proof = None
        if s.security.verifier is not None:  # the user's own signed request, for the cloud to check
            proof = {"headers": {h: request.headers[h] for h in (CERT_HEADER, SIGNED_HEADER, SIGNATURE_HEADER)},
                     "body": base64.b64encode(await request.body()).decode()}
        caller = principal_of(request)
        placement = await anyio.to_thread.run_sync(lambda: s.register_user(body, caller, proof))  # calls the cloud
        return {"ok": True, "edge_id": s.edge_id, "placement": placement}

    @app.get("/v1/users/{user_id}")
    def user_status(user_id: str, request: Request) -> dict[str, Any]:
        """Whether this edge knows the user (a user checks it to notice an edge that restarted; an admin may ask)."""
        caller = principal_of(request)
        if caller is None or caller.role != "admin":
            require_identity(caller, user_id, "user")
        if user_id not in svc().ready().users:
            raise NotFound(f"user '{user_id[:64]}' is not registered at this edge")
        return {"user_id": user_id, "registered": True}

    async def serve(request: Request, endpoint: str) -> Response:
        s: EdgeService = svc()
        ledger = s.ledger if endpoint != "start" else None  # starts come from the cloud, which counts them
        server = s.ready()
        resp = await serve_message(request, getattr(server, f"on_{endpoint}"), s.settings, ledger,
                                   authorize=own_messages if endpoint != "start" else None,
                                   after=getattr(server, f"after_{endpoint}", None))
        if endpoint != "start":
            s.counters["updates" if endpoint == "update" else "steps"] += 1
        return resp

    for endpoint in ("step", "backward", "start", "update"):
        msgpack_route(app, endpoint, serve)
    return app
