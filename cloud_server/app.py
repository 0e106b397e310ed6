"""The cloud's HTTP surface: the round API, registration, the step and update endpoints, health and metrics."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from cloud_server.service import CloudService, EdgeIn, UserIn
from shared.config.round import RoundBody
from shared.config.settings import CloudSettings
from shared.errors import Conflict, NotFound
from shared.http.auth import Auth
from shared.http.server import msgpack_route, serve_message, service_app

Id = Annotated[int, Path(ge=0, le=2**63 - 1)]  # SQLite's integers
UI = FilePath(__file__).with_name("ui")  # the dashboard: static files, the round API called from the page


def round_api_write(method: str, path: str) -> bool:
    """The admin token's routes: starting and cancelling rounds."""
    return method == "POST" and (path.rstrip("/") == "/v1/rounds" or path.endswith("/cancel"))


def create_app(settings: CloudSettings) -> FastAPI:
    """The cloud's FastAPI app; the model loads at start-up (lifespan), so ``/healthz`` answers once ready."""
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    app, svc = service_app("cloud", "Coordinator of a user / edge / cloud split LoRA fine-tuning deployment.",
                           lambda: CloudService(settings),
                           Auth(settings.token_value(), admin_token, settings.insecure_dev), is_admin=round_api_write)

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
    def register_edge(body: EdgeIn) -> dict[str, Any]:
        s: CloudService = svc()
        s.register_edge(body)
        return s.experiment.to_meta()

    @app.post("/v1/edges/{edge_id}/users")
    def register_user(edge_id: str, body: UserIn) -> dict[str, Any]:
        s: CloudService = svc()
        s.coordinator.register_user(edge_id, body.user_id, body.num_samples)
        s.save_topology()
        return {"ok": True}

    async def serve(request: Request, endpoint: str) -> Response:
        s: CloudService = svc()
        resp = await serve_message(request, getattr(s.coordinator, f"on_{endpoint}"), s.settings, s.ledger,
                                   after=getattr(s.coordinator, f"after_{endpoint}", None))
        s.counters["steps" if endpoint == "step" else "updates"] += 1
        return resp

    for endpoint in ("step", "update"):
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
        view = svc().round_view(round_id)
        if view is None:
            raise HTTPException(404, f"no round {round_id}")
        return view

    @app.post("/v1/rounds/{round_id}/cancel")
    def cancel_round(round_id: Id) -> dict[str, Any]:
        s: CloudService = svc()
        try:
            return s.coordinator.cancel(round_id).to_dict()
        except NotFound:
            if s.store.round(round_id) is None:
                raise HTTPException(404, f"no round {round_id}") from None
            raise Conflict(f"round {round_id} finished before this cloud process started") from None

    @app.get("/v1/adapters/{version}")
    def adapters(version: Id) -> Response:
        try:
            data = svc().store.version_bytes(version)
        except KeyError:
            raise HTTPException(404, f"no adapter version {version}") from None
        return Response(data, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="adapters-v{version}.safetensors"'})

    @app.get("/ui", include_in_schema=False)
    def ui() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=UI, html=True), name="ui")  # open, like /healthz: it holds no data
    return app
