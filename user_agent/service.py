"""The user (device) as a service: it fetches the deployment's spec from its edge, loads its data and blocks, registers."""

from __future__ import annotations

import logging

from shared.config.deployment import Experiment
from shared.config.settings import UserSettings
from shared.http.client import HttpLink, get_json, post_json
from shared.http.server import BackgroundStart
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

    def __init__(self, settings: UserSettings) -> None:
        self.settings = settings
        self.user_id = settings.ident()
        self.agent: UserAgent | None = None
        super().__init__()

    @property
    def started(self) -> bool:
        return self.agent is not None

    def start(self) -> None:
        s = self.settings
        edge = s.edge.rstrip("/")
        experiment = Experiment.from_meta(get_json(f"{edge}/v1/spec", deadline=3600, token=s.token_value(),
                                                   verify=s.ca_file or True))
        client = experiment.data.client(s.client_index)
        source = resolve_model(experiment.spec.model)
        runtime = TierRuntime(Tier.USER, source, experiment.spec, device=s.device)
        emulator = link_emulator(s.link_profile, derive_seed(self.user_id, "link"), rate_shaped=s.link_rate_shaped)
        link = HttpLink(s.edge, upward=True, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                        token=s.token_value(), verify=s.ca_file or True, emulator=emulator)
        agent = UserAgent(self.user_id, runtime, client, source.tokenizer(), link, max_len=experiment.data.max_len,
                          slowdown=s.slowdown, pad_to_max=experiment.data.pad_to_max)
        post_json(f"{edge}/v1/users", {"user_id": self.user_id, "url": s.url(), "num_samples": agent.num_samples,
                                       "link_profile": s.link_profile, "link_rate_shaped": s.link_rate_shaped},
                  deadline=3600, token=s.token_value(), verify=s.ca_file or True)
        self.agent = agent
        log.info("user %s ready: client %d, %d train / %d eval examples", self.user_id, s.client_index,
                 len(client.train), len(client.eval))

    def ready(self) -> UserAgent:
        if self.agent is None:
            raise self.starting()
        return self.agent
