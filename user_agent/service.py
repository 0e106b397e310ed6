"""The user (device) as a service: it fetches the deployment's spec from its edge, loads its data and blocks, registers."""

from __future__ import annotations

import logging
import threading
import time

from shared.config.deployment import Experiment
from shared.config.settings import UserSettings
from shared.http.client import HttpLink, TransportError, get_json, post_json
from shared.http.server import BackgroundStart
from shared.http.service import TierSecurity
from shared.model.sources import resolve_model
from shared.protocol.enums import Tier
from shared.protocol.links import link_emulator
from shared.runtime.tier import TierRuntime
from shared.seeds import derive_seed
from user_agent.compute import UserAgent

log = logging.getLogger("splitllm.user")


class UserService(BackgroundStart):
    """Fetches the deployment's spec from its edge, loads its data and blocks, then registers."""

    tier = "user"

    def __init__(self, settings: UserSettings, security: TierSecurity, user_id: str, client_index: int) -> None:
        self.settings, self.security, self.user_id, self.client_index = settings, security, user_id, client_index
        self.edge_id: str | None = None  # learnt from the edge's spec; only it may start this user
        self.agent: UserAgent | None = None
        super().__init__()

    @property
    def started(self) -> bool:
        return self.agent is not None

    def start(self) -> None:
        s = self.settings
        edge = s.edge.rstrip("/")
        meta = get_json(f"{edge}/v1/spec", deadline=3600, identity=self.security.identity, audience="edge")
        experiment, self.edge_id = Experiment.from_meta(meta), str(meta.get("edge_id", ""))
        audience = f"edge:{self.edge_id}"
        client = experiment.data.client(self.client_index)
        source = resolve_model(experiment.spec.model)
        runtime = TierRuntime(Tier.USER, source, experiment.spec, device=s.device)
        emulator = link_emulator(s.link_profile, derive_seed(self.user_id, "link"), rate_shaped=s.link_rate_shaped)
        link = HttpLink(s.edge, upward=True, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                        identity=self.security.identity, audience=audience, emulator=emulator)
        tokenizer = source.tokenizer(experiment.spec.tokenizer)
        log.info("user %s: tokenizer %s", self.user_id, tokenizer.origin)
        agent = UserAgent(self.user_id, runtime, client, tokenizer, link, max_len=experiment.data.max_len,
                          slowdown=s.slowdown, pad_to_max=experiment.data.pad_to_max)
        self.register(agent.num_samples, deadline=3600)
        self.agent = agent
        if s.heartbeat:
            threading.Thread(target=self._heartbeat, name="user-heartbeat", daemon=True).start()
        log.info("user %s ready: client %d, %d train / %d eval examples", self.user_id, self.client_index,
                 len(client.train), len(client.eval))

    def register(self, num_samples: int, deadline: float) -> None:
        s = self.settings
        post_json(f"{s.edge.rstrip('/')}/v1/users", {"user_id": self.user_id, "url": s.url(), "num_samples": num_samples,
                                                     "link_profile": s.link_profile, "link_rate_shaped": s.link_rate_shaped},
                  deadline=deadline, identity=self.security.identity, audience=f"edge:{self.edge_id}")

    def _heartbeat(self) -> None:
        """Register again whenever the edge no longer knows this user (it restarted, and lost its registrations)."""
        s, agent = self.settings, self.agent
        while agent is not None:
            time.sleep(s.heartbeat)
            try:
                get_json(f"{s.edge.rstrip('/')}/v1/users/{self.user_id}", deadline=s.heartbeat,
                         identity=self.security.identity, audience=f"edge:{self.edge_id}")
            except TransportError as exc:
                if exc.status != 404:
                    log.debug("heartbeat: edge unreachable (%s)", exc)
                    continue
                log.warning("the edge no longer knows user %s (it restarted?): registering again", self.user_id)
                try:
                    self.register(agent.num_samples, deadline=s.heartbeat)
                except Exception as again:  # the next heartbeat tries again
                    log.warning("registering again failed: %s", again)

    def ready(self) -> UserAgent:
        if self.agent is None:
            raise self.starting()
        return self.agent
