"""The cloud's HTTP surface: the round API, registration, the step and update endpoints, credentials, health, metrics."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from cloud_server.service import CloudService, EdgeIn, RevokeIn, UserIn
from shared.config.round import RoundBody
from shared.config.settings import CloudSettings
from shared.errors import Conflict, Forbidden, NotFound
from shared.http.auth import Auth, principal_of, rule
from shared.http.credentials import Principal, Revocations
from shared.http.server import msgpack_route, serve_message, service_app
from shared.http.service import tier_security
from shared.protocol.wire import Message

# A round id or version: a plain decimal number that fits SQLite's integers (no sign, no leading zero, no "_").
Id = Annotated[str, Path(pattern=r"^(0|[1-9][0-9]{0,17})$", description="a decimal number")]
UI = FilePath(__file__).with_name("ui")  # the dashboard: static files, the round API called from the page

# Who may call what: edges register, step and report; an admin runs rounds and manages credentials.
RULES = (
    rule("GET", "/v1/spec", "edge", "admin"),
    rule("POST", "/v1/edges", "edge"),
    rule("POST", "/v1/edges/[^/]+/users", "edge"),
    rule("POST", "/v1/(step|backward|update)", "edge"),
    rule("*", "/v1/(rounds|adapters|credentials)(/.*)?", "admin"),
)


def create_app(settings: CloudSettings) -> FastAPI:
    """The cloud's FastAPI app; the model loads at start-up (lifespan), so ``/healthz`` answers once ready."""
    revocations = Revocations()
    security = tier_security(settings, "cloud", revocations)
    auth = Auth(security.verifier, {"cloud"}, RULES, settings.insecure_dev, settings.token_value(), settings.admin_secret())
    app, svc = service_app("cloud", "Coordinator of a user / edge / cloud split LoRA fine-tuning deployment.",
                           lambda: CloudService(settings, security, revocations), auth)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        s: CloudService = svc()
        return {"status": "ok", "tier": "cloud", "version": s.coordinator.version,
                "edges": len(s.coordinator.edges), "users": sum(len(u) for u in s.coordinator.edge_users.values())}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(svc().metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/spec")
    def spec() -> dict[str, Any]:
        return svc().experiment.to_meta()

    @app.post("/v1/edges")
    def register_edge(body: EdgeIn, request: Request) -> dict[str, Any]:
        return svc().register_edge(body, principal_of(request))

    @app.post("/v1/edges/{edge_id}/users")
    def register_user(edge_id: str, body: UserIn, request: Request) -> dict[str, Any]:
        svc().register_user(edge_id, body, principal_of(request))
        return {"ok": True}

    def own_sessions(msg: Message, caller: Principal) -> None:
        """An edge steps only the sessions of users registered behind it."""
        if svc().coordinator.edge_of(str(msg.meta.get("user"))) != caller.id:
            raise Forbidden(f"edge '{caller.id}' may not step user '{str(msg.meta.get('user'))[:64]}'")

    def own_report(msg: Message, caller: Principal) -> None:
        if msg.meta.get("edge") != caller.id:
            raise Forbidden(f"edge '{caller.id}' may not report as edge '{str(msg.meta.get('edge'))[:64]}'")

    async def serve(request: Request, endpoint: str) -> Response:
        s: CloudService = svc()
        resp = await serve_message(request, getattr(s.coordinator, f"on_{endpoint}"), s.settings, s.ledger,
                                   authorize=own_report if endpoint == "update" else own_sessions,
                                   after=getattr(s.coordinator, f"after_{endpoint}", None))
        s.counters["updates" if endpoint == "update" else "steps"] += 1
        return resp

    for endpoint in ("step", "backward", "update"):
        msgpack_route(app, endpoint, serve)

    @app.post("/v1/rounds", status_code=202)
    def start_round(body: RoundBody | None = None) -> dict[str, Any]:  # type: ignore[valid-type]
        record = svc().start_round(body)
        return {"round_id": record.round_id, "state": record.state, "base_version": record.base_version}

    @app.get("/v1/rounds")
    def list_rounds() -> dict[str, Any]:
        s: CloudService = svc()
        stored = {r["round_id"]: r for r in s.store.rounds()}
        stored.update({rid: r.to_dict() for rid, r in s.coordinator.rounds.items()})
        return {"version": s.coordinator.version, "rounds": [stored[k] for k in sorted(stored)]}

    @app.get("/v1/rounds/{round_id}")
    def get_round(round_id: Id) -> dict[str, Any]:
        view = svc().round_view(int(round_id))
        if view is None:
            raise HTTPException(404, f"no round {round_id}")
        return view

    @app.post("/v1/rounds/{round_id}/cancel")
    def cancel_round(round_id: Id) -> dict[str, Any]:
        s: CloudService = svc()
        try:
            return s.coordinator.cancel(int(round_id)).to_dict()
        except NotFound:
            if s.store.round(int(round_id)) is None:
                raise HTTPException(404, f"no round {round_id}") from None
            raise Conflict(f"round {round_id} finished before this cloud process started") from None

    @app.get("/v1/adapters/{version}")
    def adapters(version: Id) -> Response:
        try:
            data = svc().store.version_bytes(int(version))
        except KeyError:
            raise HTTPException(404, f"no adapter version {version}") from None
        return Response(data, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="adapters-v{version}.safetensors"'})

    @app.post("/v1/credentials/revoke")
    def revoke(body: RevokeIn) -> dict[str, Any]:
        return svc().revoke(body)

    @app.get("/v1/credentials/revoked")
    def revoked() -> dict[str, Any]:
        return svc().revocations.to_meta()

    @app.get("/ui", include_in_schema=False)
    def ui() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=UI, html=True), name="ui")  # open, like /healthz: it holds no data
    return app
