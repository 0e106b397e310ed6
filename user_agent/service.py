"""The user (device) as a service: it fetches the deployment's spec from its edge, loads its data and blocks, registers."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from shared.config.federation import Deployment
from shared.config.settings import UserSettings
from shared.errors import Forbidden
from shared.http.client import HttpLink, TransportError, control_client, get_json, post_json
from shared.http.connections import Throttled
from shared.http.server import BackgroundStart
from shared.http.service import TierSecurity
from shared.http.tickets import check_ticket
from shared.model.sources import resolve_model
from shared.protocol.enums import Tier
from shared.protocol.links import link_emulator
from shared.protocol.starts import UserStart
from shared.protocol.wire import Message
from shared.runtime.tier import TierRuntime
from shared.seeds import derive_seed
from user_agent.compute import UserAgent

log = logging.getLogger("splitllm.user")


class EdgeContact:
    """What this device last heard from its edge, for ``GET /v1/status`` (``edge``) and its log: ``unknown``
    (before its registration), ``ok``, ``unreachable`` (no answer, or the edge's own trouble) or ``refused`` (401 or
    403: its credential is no longer accepted, revoked or expired, and only a new one helps), with the status, the
    edge's reason and since when."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict[str, Any] = {"state": "unknown", "status": None, "reason": None, "since": _now()}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.state)

    def heard(self, error: TransportError | None = None) -> bool:
        """Record an answer (``error`` None) or a failed call; True when the state changed (worth a log line)."""
        if error is None:
            state, status, reason = "ok", None, None
        else:
            state = "refused" if error.status in (401, 403) else "unreachable"
            status, reason = error.status, error.detail or str(error)
        with self.lock:
            changed = (state, reason) != (self.state["state"], self.state["reason"])
            if changed:
                self.state = {"state": state, "status": status, "reason": reason, "since": _now()}
        return changed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class UserService(BackgroundStart):
    """Fetches the deployment's spec from its edge, loads its data and blocks, then registers."""

    tier = "user"

    def __init__(self, settings: UserSettings, security: TierSecurity, user_id: str, client_index: int) -> None:
        self.settings, self.security, self.user_id, self.client_index = settings, security, user_id, client_index
        self.edge_id: str | None = None  # learnt from the edge's spec; only it may start this user
        self.agent: UserAgent | None = None
        self.placement: dict[str, Any] = {}  # what the cloud assigned at registration: data, cut, rank
        self.edge_contact = EdgeContact()  # what the heartbeat last heard from the edge
        self.refused_start: dict[str, Any] | None = None  # the last start refused for its ticket, for /v1/status
        self.refused_starts = 0  # how many, for /metrics
        self._refusals = Throttled(logger=log)
        self._closed = threading.Event()  # set at shutdown: the heartbeat stops
        super().__init__()

    def check_start(self, msg: Message, edge_id: str) -> None:
        """A start counts only with the cloud's ticket for it (``shared.http.tickets``): without one, the cloud did
        not start this round, and the edge (perhaps revoked) may not use this device. A refusal (403) is logged and
        kept for ``GET /v1/status``. Development (no credentials) has no tickets."""
        if self.security.verifier is None:
            return
        plan = UserStart.plan_of(msg)  # its adapters are read once, if the ticket holds
        try:
            check_ticket(self.security.verifier, msg.meta.get("ticket"), plan, edge_id, self.user_id)
        except Forbidden as exc:
            self.refused_starts += 1
            self.refused_start = {"round": plan.round_id, "mode": plan.mode.value, "edge": edge_id,
                                  "reason": exc.reason, "at": _now()}
            self._refusals.warn("refused edge %s's start of round %s (%s): %s", edge_id, plan.round_id,
                                plan.mode.value, exc.reason)
            raise

    @property
    def started(self) -> bool:
        return self.agent is not None

    def start(self) -> None:
        """Fetch the spec, load this device's data, register (the cloud assigns its placement), then load its blocks."""
        s = self.settings
        edge = s.edge.rstrip("/")
        meta = get_json(f"{edge}/v1/spec", deadline=3600, identity=self.security.identity, audience="edge")
        self.edge_id = str(meta.get("edge_id", ""))
        experiment = Deployment.from_meta(meta["deployment"]).experiment(s.data)
        audience = f"edge:{self.edge_id}"
        client = experiment.data.client(self.client_index)
        self.placement = self.register(len(client.train), deadline=3600)
        self.edge_contact.heard(None)  # registered: the edge answers
        source = resolve_model(experiment.spec.model)
        runtime = TierRuntime(Tier.USER, source, experiment.spec, device=s.device, cut=int(self.placement["cut"]),
                              autocast=s.autocast)
        emulator = link_emulator(s.link_profile, derive_seed(self.user_id, "link"), rate_shaped=s.link_rate_shaped)
        link = HttpLink(s.edge, upward=True, timeout=s.request_timeout, max_message_bytes=s.max_message_bytes,
                        identity=self.security.identity, audience=audience, emulator=emulator)
        tokenizer = source.tokenizer(experiment.spec.tokenizer)
        log.info("user %s: tokenizer %s", self.user_id, tokenizer.origin)
        agent = UserAgent(self.user_id, runtime, client, tokenizer, link, max_len=experiment.data.max_len,
                          slowdown=s.slowdown, pad_to_max=experiment.data.pad_to_max)
        self.agent = agent
        if s.heartbeat:
            threading.Thread(target=self._heartbeat, name="user-heartbeat", daemon=True).start()
        log.info("user %s ready: client %d of %s, %d train / %d eval examples, blocks %s, rank %s", self.user_id,
                 self.client_index, experiment.data.name, len(client.train), len(client.eval),
                 runtime.partition.layer_ids, self.placement["rank"])

    def register(self, num_samples: int, deadline: float, client: Any = None) -> dict[str, Any]:
        """Register at the edge with what this device declares; the placement the cloud assigned it."""
        s = self.settings
        declared = s.model_dump(include={"model", "data", "max_blocks", "memory_budget", "rank"})
        reply = post_json(f"{s.edge.rstrip('/')}/v1/users",
                          {"user_id": self.user_id, "url": s.url(), "num_samples": num_samples,
                           "link_profile": s.link_profile, "link_rate_shaped": s.link_rate_shaped, **declared},
                          deadline=deadline, identity=self.security.identity, audience=f"edge:{self.edge_id}",
                          client=client)
        return reply["placement"]

    def _heartbeat(self) -> None:
        """Register again whenever the edge no longer knows this user (it restarted, and lost its registrations);
        say when the edge stops accepting this device's credential (revoked, expired), and when it answers again.
        One client for every call, so that its connection (and TLS session) is kept between beats."""
        s, agent = self.settings, self.agent
        with control_client(self.security.identity, f"edge:{self.edge_id}") as client:
            while agent is not None and not self._closed.wait(s.heartbeat):
                try:
                    self._beat(agent, client)
                except Exception:  # the heartbeat outlives anything one beat meets
                    log.exception("heartbeat of user %s", self.user_id)

    def close(self) -> None:
        """At the app's shutdown: the heartbeat stops (an app run in a process that goes on, as in tests, would
        otherwise keep beating with this user's credential)."""
        self._closed.set()

    def _beat(self, agent: UserAgent, client: Any) -> None:
        s = self.settings
        try:
            get_json(f"{s.edge.rstrip('/')}/v1/users/{self.user_id}", deadline=s.heartbeat,
                     identity=self.security.identity, audience=f"edge:{self.edge_id}", client=client)
        except TransportError as exc:
            if exc.status == 404:  # an answer: the edge is there but has forgotten this user
                self._heard(None)
                self._register_again(agent, client)
            else:
                self._heard(exc)
            return
        except Exception as exc:  # a read timeout, a TLS failure: no answer
            self._heard(TransportError(f"{type(exc).__name__}: {exc}"))
            return
        self._heard(None)

    def _heard(self, error: TransportError | None) -> None:
        if not self.edge_contact.heard(error):
            return
        now = self.edge_contact.snapshot()
        if now["state"] == "refused":
            log.error("the edge refuses the credential of user %s (HTTP %s: %s): it takes no part in rounds until "
                      "it runs with a new credential", self.user_id, now["status"], now["reason"])
        elif now["state"] == "unreachable":
            log.warning("heartbeat: the edge does not answer user %s (%s)", self.user_id, now["reason"])
        else:
            log.info("heartbeat: the edge answers user %s again", self.user_id)

    def _register_again(self, agent: UserAgent, client: Any) -> None:
        log.warning("the edge no longer knows user %s (it restarted?): registering again", self.user_id)
        try:
            placement = self.register(agent.num_samples, deadline=self.settings.heartbeat, client=client)
        except Exception as again:  # the next heartbeat tries again
            if isinstance(again, TransportError) and again.status in (401, 403):
                self._heard(again)  # refused: said once, by the contact's state
            else:
                log.warning("registering again failed: %s", again)
            return
        if placement != self.placement:
            log.warning("the cloud now places user %s at %s (was %s): restart it to follow", self.user_id,
                        placement, self.placement)

    def ready(self) -> UserAgent:
        if self.agent is None:
            raise self.starting()
        return self.agent
