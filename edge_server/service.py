"""The edge as a service: it registers with its cloud, loads its blocks, and registers its users."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from edge_server.compute import EdgeServer
from shared.config.deployment import Experiment
from shared.config.federation import Deployment
from shared.config.placement import MAX_NUM_SAMPLES
from shared.config.settings import EdgeSettings
from shared.errors import InvalidInput
from shared.http.auth import callback_allowed, check_url, require_identity
from shared.http.client import HttpLink, TransportError, post_json
from shared.http.credentials import Principal, Revocations
from shared.http.metrics import ByteLedger
from shared.http.server import BackgroundStart
from shared.http.service import TierSecurity
from shared.model.sources import resolve_model
from shared.protocol.enums import Tier
from shared.protocol.links import link_emulator
from shared.runtime.copies import auto_copies
from shared.runtime.tier import TierRuntime
from shared.seeds import derive_seed

log = logging.getLogger("splitllm.edge")


class UserIn(BaseModel):
    """``POST /v1/users``: a user registering with this edge. A field it does not know is refused (422), so that a
    misspelt declaration (``max_block``) is not silently left out."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_url)]
    num_samples: int = Field(ge=0, le=MAX_NUM_SAMPLES)
    link_profile: str = Field("none", description="the user's link profile; starts sent to it are delayed by it")
    link_rate_shaped: bool = Field(False, description="the network shapes the user's link rates: emulate delay and loss only")
    model: str | None = Field(None, max_length=2048, description="the model it trains (this edge's)")
    data: str | None = Field(None, max_length=64, description="the task it trains (default: the deployment's first)")
    max_blocks: int | None = Field(None, ge=0, le=100_000, description="the most blocks its device holds")
    memory_budget: int | None = Field(None, ge=0, description="or the parameter bytes its device holds")
    rank: int | None = Field(None, ge=1, le=100_000, description="its LoRA rank")


class EdgeService(BackgroundStart):
    """Registers with the cloud (retrying until it answers), then loads the edge partition."""

    tier = "edge"

    def __init__(self, settings: EdgeSettings, security: TierSecurity, edge_id: str, revocations: Revocations) -> None:
        self.settings, self.security, self.edge_id, self.revocations = settings, security, edge_id, revocations
        self.ledger = ByteLedger()
        self.experiment: Experiment | None = None
        self.deployment: Deployment | None = None
        self.server: EdgeServer | None = None
        self.counters = {"steps": 0, "updates": 0}
        super().__init__()

    @property
    def started(self) -> bool:
        return self.server is not None

    def start(self) -> None:
        s = self.settings
        emulator = link_emulator(s.link_profile, derive_seed(self.edge_id, "link"),  # validated before registering
                                 rate_shaped=s.link_rate_shaped)
        meta = post_json(f"{s.cloud.rstrip('/')}/v1/edges",
                         {"edge_id": self.edge_id, "url": s.url(), "link_profile": s.link_profile,
                          "link_rate_shaped": s.link_rate_shaped, "model": s.model}, deadline=3600,
                         identity=self.security.identity, audience="cloud")
        self.revocations.merge(meta.get("revoked") or {})
        self.experiment = Experiment.from_meta(meta)
        self.deployment = dep = Deployment.from_meta(meta["deployment"])
        spec = self.experiment.spec  # blocks are loaded as users register: [their lowest cut, b)
        runtime = TierRuntime(Tier.EDGE, resolve_model(spec.model), spec, device=s.device, cut=spec.split[1],
                              tasks={t: e.spec for t, e in dep.experiments.items()}, autocast=s.autocast,
                              copies=s.block_copies or auto_copies(s.device, s.threads))
        cloud = HttpLink(s.cloud, upward=True, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                         identity=self.security.identity, audience="cloud", emulator=emulator)
        self.server = EdgeServer(self.edge_id, runtime, cloud, ledger=self.ledger, max_sessions=s.max_sessions,
                                 on_revoked=self.revocations.merge)
        log.info("edge %s ready (%s, split %s; blocks load as users register)", self.edge_id, dep.name, spec.split)

    def ready(self) -> EdgeServer:
        if self.server is None:
            raise self.starting()
        return self.server

    def register_user(self, body: UserIn, caller: Principal | None, proof: dict[str, Any] | None) -> dict[str, Any]:
        """A user (re-)registering itself: only with its own credential, at an allowed callback URL; the cloud
        gets the user's signed request (``proof``) so that it knows the user asked for this edge, and assigns its
        placement (this edge then holds the blocks from the user's cut on). A registration the cloud refuses is
        refused to the user with the cloud's status and reason."""
        server = self.ready()
        s = self.settings
        require_identity(caller, body.user_id, "user")
        refused = callback_allowed(body.url, s.callback_hosts)
        if refused:
            raise InvalidInput(f"callback URL refused: {refused}")
        try:
            emulator = link_emulator(body.link_profile, derive_seed(body.user_id, "down"),
                                     rate_shaped=body.link_rate_shaped)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        link = HttpLink(body.url, upward=False, timeout=min(s.request_timeout, s.start_timeout),  # it carries starts
                        max_message_bytes=s.max_message_bytes,
                        ledger=self.ledger, emulator=emulator, identity=self.security.identity,
                        audience=f"user:{body.user_id}")
        declared = body.model_dump(include={"model", "data", "max_blocks", "memory_budget", "rank"})
        try:  # the cloud learns of the user only once the edge can call it back (a start waits for the rest)
            with server.arriving_user(body.user_id):
                reply = post_json(f"{s.cloud.rstrip('/')}/v1/edges/{self.edge_id}/users",
                                  {"user_id": body.user_id, "num_samples": body.num_samples, "registration": proof,
                                   **declared}, deadline=60, identity=self.security.identity, audience="cloud")
                placement = reply["placement"]
                old = server.users.get(body.user_id)
                server.register_user(body.user_id, link, body.num_samples, int(placement["cut"]))
        except TransportError as exc:
            link.close()
            if exc.status in (404, 422):  # the cloud refused the registration: the user's to fix
                raise InvalidInput(f"the cloud refused the registration: {exc.detail}") from None
            raise
        except Exception:
            link.close()
            raise
        if old is not None:
            old.close()
        return placement
