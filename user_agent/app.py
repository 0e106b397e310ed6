"""The user (device) service: registration with its edge, the round start endpoint, health and metrics."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response

from shared.seeds import derive_seed
from shared.config.deployment import Experiment
from shared.protocol.links import LinkEmulator, get_profile
from shared.http.auth import Auth
from shared.http.server import guard
from shared.http.client import HttpLink, get_json, post_json
from shared.http.metrics import prometheus, resident_memory_bytes
from shared.http.server import read_message
from shared.model.sources import resolve_model
from shared.config.settings import UserSettings
from shared.runtime.tier import TierRuntime
from shared.protocol.wire import Message
from user_agent.compute import UserAgent

log = logging.getLogger("splitllm.user")


class UserService:
    """Fetches the deployment's spec from its edge, loads its data and blocks, then registers."""

    def __init__(self, settings: UserSettings) -> None:
        self.settings = settings
        self.user_id = settings.ident()
        self.agent: UserAgent | None = None
        self.error: str | None = None
        self.jobs: dict[str, str] = {}
        self.lock = threading.Lock()
        self.last_error: str | None = None
        threading.Thread(target=self._start, name="user-start", daemon=True).start()

    def _start(self) -> None:
        s = self.settings
        edge = s.edge.rstrip("/")
        try:
            experiment = Experiment.from_meta(get_json(f"{edge}/v1/spec", deadline=3600, token=s.token_value(),
                                                       verify=s.ca_file or True))
            client = experiment.data.client(s.client_index)
            source = resolve_model(experiment.spec.model)
            runtime = TierRuntime("user", source, experiment.spec, device=s.device)
            profile = get_profile(s.link_profile)
            link = HttpLink(s.edge, upward=True, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                            token=s.token_value(), verify=s.ca_file or True,
                            emulator=LinkEmulator(profile, seed=derive_seed(self.user_id, "link")) if profile else None)
            agent = UserAgent(self.user_id, runtime, client, source.tokenizer(), link, max_len=experiment.data.max_len,
                              slowdown=s.slowdown, pad_to_max=experiment.data.pad_to_max)
            post_json(f"{edge}/v1/users", {"user_id": self.user_id, "url": s.url(), "num_samples": agent.num_samples,
                       "link_profile": s.link_profile},
                      deadline=3600, token=s.token_value(), verify=s.ca_file or True)
            self.agent = agent
            log.info("user %s ready: client %d, %d train / %d eval examples", self.user_id, s.client_index,
                     len(client.train), len(client.eval))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("user start-up failed: %s", self.error)

    def claim(self, plan: dict[str, Any]) -> bool:
        """True for the first start of a (round, phase); a retried start is a no-op."""
        key = f"{plan['round_id']}:{plan['mode']}"
        with self.lock:
            if key in self.jobs:
                return False
            self.jobs[key] = "running"
            return True

    def run(self, msg: Message) -> None:
        key = f"{msg.meta['plan']['round_id']}:{msg.meta['plan']['mode']}"
        try:
            self.agent.on_start(msg)
            self.jobs[key] = "reported"
        except Exception as exc:  # the round's deadline at the cloud takes care of the rest
            self.jobs[key] = "failed"
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("round %s failed on this device", key)


def create_app(settings: UserSettings) -> FastAPI:
    holder: dict[str, UserService] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder["svc"] = UserService(settings)
        yield
        holder.pop("svc")

    app = FastAPI(title="splitllm user", version="0.1.0", lifespan=lifespan,
                  description="A device: local data, embeddings and the first blocks, the local training loop.")

    guard(app, Auth(settings.token_value(), None, settings.insecure_dev))

    def svc() -> UserService:
        if "svc" not in holder:
            raise HTTPException(503, "the user agent is starting", headers={"Retry-After": "1"})
        return holder["svc"]

    @app.get("/healthz")
    def healthz() -> Response:
        s = svc()
        ready = s.agent is not None
        body = {"status": "ok" if ready else ("error" if s.error else "starting"), "tier": "user",
                "user_id": s.user_id, "error": s.error}
        return Response(json.dumps(body), status_code=200 if ready else 503, media_type="application/json")

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        s = svc()
        return {"user_id": s.user_id, "ready": s.agent is not None, "jobs": s.jobs, "last_error": s.last_error}

    @app.get("/metrics")
    def metrics() -> Response:
        s = svc()
        stats = s.agent.edge.stats.snapshot() if s.agent else {"bytes_up": 0, "bytes_down": 0}
        text = prometheus({
            "splitllm_ready": ("gauge", "1 once registered and loaded", [({}, int(s.agent is not None))]),
            "splitllm_jobs": ("gauge", "round jobs by state",
                              [({"state": st}, sum(1 for v in s.jobs.values() if v == st)) for st in ("running", "reported", "failed")]),
            "splitllm_bytes_total": ("counter", "bytes to and from the edge",
                                     [({"direction": "up"}, stats["bytes_up"]), ({"direction": "down"}, stats["bytes_down"])]),
            "process_resident_memory_bytes": ("gauge", "resident memory", [({}, resident_memory_bytes())]),
        })
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/start", status_code=202)
    async def start(request: Request) -> Response:
        s = svc()
        if s.agent is None:
            raise HTTPException(503, s.error or "the user agent is starting", headers={"Retry-After": "1"})
        msg, _ = await read_message(request, s.settings.max_message_bytes, "start", s.settings.max_tensor_elements)
        plan = msg.meta.get("plan")
        if not isinstance(plan, dict) or "round_id" not in plan or "mode" not in plan:
            raise HTTPException(422, "start message lacks meta.plan with round_id and mode")
        if s.claim(plan):
            threading.Thread(target=s.run, args=(msg,), name=f"round-{plan['round_id']}", daemon=True).start()
        from shared.protocol.wire import encode, CONTENT_TYPE

        return Response(encode(Message(kind="accepted", meta={"round": plan["round_id"], "user": s.user_id})),
                        status_code=202, media_type=CONTENT_TYPE)

    return app
