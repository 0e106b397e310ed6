"""The edge as a service: it registers with its cloud, loads its blocks, and registers its users."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from edge_server.compute import EdgeServer
from shared.config.deployment import Experiment
from shared.config.settings import EdgeSettings
from shared.errors import InvalidInput
from shared.http.auth import callback_allowed, check_url, require_identity
from shared.http.client import HttpLink, post_json
from shared.http.credentials import Principal, Revocations
from shared.http.metrics import ByteLedger
from shared.http.server import BackgroundStart
from shared.http.service import TierSecurity
from shared.model.sources import resolve_model
from shared.protocol.enums import Tier
from shared.protocol.links import link_emulator
from shared.runtime.tier import TierRuntime
from shared.seeds import derive_seed

log = logging.getLogger("splitllm.edge")


class UserIn(BaseModel):
    """``POST /v1/users``: a user registering with this edge."""

    user_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(check_url)]
    num_samples: int = Field(ge=0)
    link_profile: str = Field("none", description="the user's link profile; starts sent to it are delayed by it")
    link_rate_shaped: bool = Field(False, description="the network shapes the user's link rates: emulate delay and loss only")


class EdgeService(BackgroundStart):
    """Registers with the cloud (retrying until it answers), then loads the edge partition."""

    tier = "edge"

    def __init__(self, settings: EdgeSettings, security: TierSecurity, edge_id: str, revocations: Revocations) -> None:
        self.settings, self.security, self.edge_id, self.revocations = settings, security, edge_id, revocations
        self.ledger = ByteLedger()
        self.experiment: Experiment | None = None
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
                          "link_rate_shaped": s.link_rate_shaped}, deadline=3600,
                         identity=self.security.identity, audience="cloud")
        self.revocations.merge(meta.get("revoked") or {})
        self.experiment = Experiment.from_meta(meta)
        runtime = TierRuntime(Tier.EDGE, resolve_model(self.experiment.spec.model), self.experiment.spec,
                              device=s.device)
        cloud = HttpLink(s.cloud, upward=True, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                         identity=self.security.identity, audience="cloud", emulator=emulator)
        self.server = EdgeServer(self.edge_id, runtime, cloud, ledger=self.ledger, max_sessions=s.max_sessions,
                                 on_revoked=self.revocations.merge)
        log.info("edge %s ready (blocks %s)", self.edge_id, runtime.partition.layer_ids)

    def ready(self) -> EdgeServer:
        if self.server is None:
            raise self.starting()
        return self.server

    def register_user(self, body: UserIn, caller: Principal | None, proof: dict[str, Any] | None) -> None:
        """A user (re-)registering itself: only with its own credential, at an allowed callback URL; the cloud
        gets the user's signed request (``proof``) so that it knows the user asked for this edge."""
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
        link = HttpLink(body.url, upward=False, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                        ledger=self.ledger, emulator=emulator, identity=self.security.identity,
                        audience=f"user:{body.user_id}")
        try:  # the cloud learns of the user only once the edge can call it back
            post_json(f"{s.cloud.rstrip('/')}/v1/edges/{self.edge_id}/users",
                      {"user_id": body.user_id, "num_samples": body.num_samples, "registration": proof}, deadline=60,
                      identity=self.security.identity, audience="cloud")
        except Exception:
            link.close()
            raise
        old = server.users.get(body.user_id)
        server.register_user(body.user_id, link, body.num_samples)
        if old is not None:
            old.close()
