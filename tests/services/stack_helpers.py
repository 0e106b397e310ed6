"""An in-process deployment for the service tests (test_security.py, test_hostile_input.py, test_faults.py,
test_fuzz_http.py): one cloud, one edge and one user, each a real FastAPI app behind a ``TestClient``,
registered with each other through their own HTTP routes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from shared.protocol.messages import RoundPlan, ack
from shared.protocol.starts import RoundStart
from shared.protocol.transport import Link, LinkStats
from shared.protocol.wire import CONTENT_TYPE, Message, encode

LIMIT = 4_000_000
TIERS = ("cloud", "edge", "user")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# Who signs a request to each tier's endpoint by default: its legitimate caller.
CALLERS = {("cloud", "step"): "edge-0", ("cloud", "update"): "edge-0", ("edge", "step"): "user-0",
           ("edge", "update"): "user-0", ("edge", "start"): "cloud", ("user", "start"): "edge-0"}
AUDIENCES = {"cloud": "cloud", "edge": "edge:edge-0", "user": "user:user-0"}
HOLDERS = {"cloud": "cloud", "edge": "edge-0", "user": "user-0"}  # who holds the stack's credential of each tier role


def route_roles(tier: str, method: str, path: str) -> frozenset[str]:
    """The roles that may call ``method path`` on ``tier`` (its app's RULES); empty if none."""
    import cloud_server.app
    import edge_server.app
    import user_agent.app

    rules = {"cloud": cloud_server.app.RULES, "edge": edge_server.app.RULES, "user": user_agent.app.RULES}[tier]
    return next((r.roles for r in rules if r.matches(method, path)), frozenset())


def route_caller(tier: str, method: str, path: str) -> str | None:
    """Who legitimately signs a request to this route (None: only an admin's bearer credential may call it)."""
    tiers = sorted(route_roles(tier, method, path) - {"admin"})
    return HOLDERS[tiers[0]] if tiers else None


class AcceptingLink(Link):
    """A peer that accepts every call and does nothing (a user that never trains); counts the calls."""

    def __init__(self, upward: bool = False) -> None:
        self.upward, self.stats, self.calls = upward, LinkStats(), []

    def request(self, endpoint: str, msg: Message) -> Message:
        self.calls.append((endpoint, msg))
        return ack()


@dataclass
class Stack:
    creds: Any  # shared.lab.credentials.Provisioned: cloud, edge-0, user-0, user-1 (registered nowhere), admin
    apps: dict[str, Any] = field(default_factory=dict)
    clients: dict[str, TestClient] = field(default_factory=dict)  # no default headers: tests pick the credential
    services: dict[str, Any] = field(default_factory=dict)

    @property
    def admin(self) -> str:
        """The admin's bearer credential."""
        return self.creds.admin_token

    def credential(self, who: str) -> Any:
        from shared.http.credentials import Credential

        return Credential.load(self.creds.credentials[who])

    def signed(self, who: str, method: str, path: str, body: bytes = b"", audience: str | None = None,
               tier: str = "cloud") -> dict[str, str]:
        """Headers of a request ``who`` signs for ``tier`` (or another ``audience``)."""
        return self.credential(who).sign(method, path, audience or AUDIENCES[tier], body)

    def caller_auth(self, tier: str, method: str, path: str) -> Any:
        """An httpx auth that signs each request as the route's legitimate caller would (an admin: its bearer)."""
        from shared.http.client import BearerAuth, SignedAuth

        who = route_caller(tier, method, path)
        return BearerAuth(self.admin) if who is None else SignedAuth(self.credential(who), AUDIENCES[tier])

    def issue(self, role: str, ident: str, ttl: float = 3600.0, deployment: str | None = None) -> Any:
        """A new credential from this deployment's key (no tier holds it): another edge, a fresh or expired one."""
        from shared.http.credentials import issue, load_private_key

        key = load_private_key(self.creds.directory / "deployment.key")
        return issue(key, deployment or self.creds.deployment, role, ident, ttl)

    @property
    def cloud(self) -> Any:
        return self.services["cloud"]

    @property
    def edge(self) -> Any:  # the edge's EdgeServer
        return self.services["edge"].server

    @property
    def user(self) -> Any:  # the user's UserAgent
        return self.services["user"].agent

    def link_client(self, tier: str, auth: Any) -> TestClient:
        """An httpx client onto ``tier``'s app that signs as the link it replaces did (for the tiers' HttpLinks)."""
        client = TestClient(self.apps[tier], raise_server_exceptions=False)
        client.auth = auth
        return client

    def post_msg(self, tier: str, endpoint: str, msg: Message | bytes, as_: str | None = "caller",
                 content_type: str = CONTENT_TYPE) -> httpx.Response:
        """POST a message to ``tier``, signed by its legitimate caller (``as_="caller"``), by another credential
        (``as_="user-1"``), or unsigned (``as_=None``)."""
        body = msg if isinstance(msg, bytes) else encode(msg)
        headers = {"content-type": content_type}
        if as_ is not None:
            who = CALLERS[(tier, endpoint)] if as_ == "caller" else as_
            headers.update(self.signed(who, "POST", f"/v1/{endpoint}", body, tier=tier))
        return self.clients[tier].post(f"/v1/{endpoint}", content=body, headers=headers)

    # sessions and messages --------------------------------------------------------------------------------
    def plan(self, round_id: int, user: str = "user-0", mode: str = "train", local_steps: int = 4) -> RoundPlan:
        return RoundPlan(round_id=round_id, user_id=user, local_steps=local_steps, batch_size=2, lr=5e-3, seed=3,
                         mode=mode)

    def open_sessions(self, round_id: int, user: str = "user-0", tiers: tuple[str, ...] = ("cloud", "edge"),
                      mode: str = "train", local_steps: int = 4) -> dict[str, Any]:
        """Sessions for (round, user) opened directly on the tiers' runtimes, from the current global state."""
        state = self.cloud.coordinator.global_state
        runtimes = {"cloud": self.cloud.runtime, "edge": self.edge.runtime}
        plan = self.plan(round_id, user, mode, local_steps)
        return {t: runtimes[t].open_session(plan, state[t]) for t in tiers}

    def step_message(self, round_id: int, step: int, user: str = "user-0", mode: str = "train", seed: int = 0,
                     batch: int = 2, seq: int = 8) -> Message:
        """A step as a user sends it (built by the user tier's own ``step_request``), with a random activation."""
        from shared.data.batching import Batch
        from user_agent.compute import step_request

        width = int(self.cloud.runtime.partition.config.hidden_size)
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[0, seq // 2:] = 0  # some padding
        rows = Batch(input_ids=torch.zeros(batch, seq, dtype=torch.int64), attention_mask=mask,
                     labels=torch.randint(0, 6, (batch,), generator=g))
        hidden = torch.randn(batch, seq, width, generator=g)
        return step_request(self.plan(round_id, user, mode), step, hidden, rows).to_message()

    def adapter_tensors(self, *tiers: str) -> dict[str, torch.Tensor]:
        state = self.cloud.coordinator.global_state
        return {f"{t}/{k}": v.clone() for t in tiers for k, v in state[t].items()}

    def ticket(self, plan: RoundPlan, edge: str = "edge-0") -> dict[str, str]:
        """The cloud's ticket for starting ``plan``'s user through ``edge``, as the cloud signs it."""
        from shared.http.tickets import issue_ticket

        return issue_ticket(self.credential("cloud"), plan, edge)

    def edge_start(self, plans: list[RoundPlan], **meta: Any) -> Message:
        """The cloud's start of ``plans`` at the edge, with its tickets (``meta``: the RoundStart's deadline, ...)."""
        adapters = AdapterBundle.from_tensors(self.adapter_tensors("user", "edge"), (Tier.USER, Tier.EDGE))
        meta.setdefault("tickets", {p.user_id: self.ticket(p) for p in plans})
        return RoundStart(plans, adapters, **meta).to_message()


@contextlib.contextmanager
def inprocess_stack(workdir: Path, edge: dict[str, Any] | None = None, drain: bool = True,
                    **cloud: Any) -> Iterator[Stack]:
    """Cloud, edge and user apps in this process, each started (lifespan) behind a TestClient.

    The edge registers with the cloud, and the user fetches the spec from and registers with the edge, through
    their HTTP routes (``post_json``/``get_json`` are pointed at the TestClients); the tiers' ``HttpLink``s
    are then pointed at TestClients too, so a round can run over the apps' real HTTP code path.
    """
    import cloud_server.app as cloud_app
    import edge_server.app as edge_app
    import edge_server.service as edge_service
    import user_agent.app as user_app
    import user_agent.service as user_service
    from shared.config.settings import CloudSettings, EdgeSettings, UserSettings
    from shared.http.client import Identity, TransportError
    from shared.lab.credentials import provision

    stack = Stack(provision(workdir / "credentials", ["edge-0"], {"user-0": 0, "user-1": 1}))
    hosts = {"cloud.test": "cloud", "edge.test": "edge", "user.test": "user"}

    def route(method: str, url: str, payload: Any, identity: Identity, audience: str) -> Any:
        u = httpx.URL(url)
        client = stack.clients.get(hosts[u.host])
        if client is None:  # a tier not started yet, or already stopped: unreachable, as over a real network
            raise TransportError(f"{url}: connection refused")
        r = client.request(method, u.raw_path.decode(), json=payload, auth=identity.auth(audience))
        if r.status_code >= 400:
            detail = r.json().get("detail") if r.headers.get("content-type") == "application/json" else r.text[:200]
            raise TransportError(f"{url}: HTTP {r.status_code}: {r.text[:200]}", r.status_code, url, str(detail))
        return r.json()

    # a kept client (``client=``, a heartbeat's) is replaced by the app's: the call signs as its identity would
    def fake_post_json(url, payload, deadline, identity=Identity(), audience="", timeout=30.0,  # noqa: ANN001
                       client=None):  # noqa: ANN001
        return route("POST", url, payload, identity, audience)

    def fake_get_json(url, deadline, identity=Identity(), audience="", timeout=30.0, client=None):  # noqa: ANN001
        return route("GET", url, None, identity, audience)

    class RecordedEdge(edge_service.EdgeService):
        def __init__(self, *args: Any) -> None:
            stack.services["edge"] = self
            super().__init__(*args)

    class RecordedUser(user_service.UserService):
        def __init__(self, *args: Any) -> None:
            stack.services["user"] = self
            super().__init__(*args)

    def secure(name: str) -> dict[str, Any]:
        return {"credential": str(stack.creds.credentials[name]), "trust_key": str(stack.creds.trust_key)}

    cloud_settings = dict(model="tiny-bert", split="1,3", data="trec", num_clients=2, max_examples_per_client=16,
                          eval_examples_per_client=4, local_steps=2, batch_size=2, seed=3, max_message_bytes=LIMIT,
                          data_dir=workdir / "cloud", **secure("cloud"))
    cloud_settings.update(cloud)
    edge_settings = dict(cloud="http://cloud.test", public_url="http://edge.test", edge_id="edge-0",
                         max_message_bytes=LIMIT, **secure("edge-0"))
    edge_settings.update(edge or {})
    stack.apps["cloud"] = cloud_app.create_app(CloudSettings(**cloud_settings))
    stack.apps["edge"] = edge_app.create_app(EdgeSettings(**edge_settings))
    stack.apps["user"] = user_app.create_app(UserSettings(edge="http://edge.test", public_url="http://user.test",
                                                          client_index=0, max_message_bytes=LIMIT, **secure("user-0")))
    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as exits:
        mp.setattr(edge_service, "post_json", fake_post_json)
        mp.setattr(edge_app, "EdgeService", RecordedEdge)
        mp.setattr(user_service, "post_json", fake_post_json)
        mp.setattr(user_service, "get_json", fake_get_json)
        mp.setattr(user_app, "UserService", RecordedUser)
        for tier in TIERS:
            client = exits.enter_context(TestClient(stack.apps[tier], raise_server_exceptions=False))
            stack.clients[tier] = client
            end = time.monotonic() + 120
            while client.get("/healthz").status_code != 200:
                svc = stack.services.get(tier)
                if svc is not None and svc.error:
                    raise RuntimeError(f"in-process {tier} failed to start: {svc.error}")
                if time.monotonic() > end:
                    raise TimeoutError(f"in-process {tier} not ready")
                time.sleep(0.02)
        stack.services["cloud"] = stack.apps["cloud"].state.service
        stack.edge.cloud.client = stack.link_client("cloud", stack.edge.cloud.auth)
        for link in stack.edge.users.values():
            link.client = stack.link_client("user", link.auth)
        stack.user.edge.client = stack.link_client("edge", stack.user.edge.auth)
        for link in stack.cloud.coordinator.edges.values():
            link.client = stack.link_client("edge", link.auth)
        try:
            yield stack
        finally:
            if drain:
                drain_rounds(stack.cloud)
            for pending in list(stack.edge.pending.values()):  # no deadline timer may fire after the apps stop
                if pending.timer is not None:
                    pending.timer.cancel()


def drain_rounds(service: Any, timeout: float = 30.0) -> None:
    """Wait until the cloud's rounds thread has finished what it was doing.

    The cloud's shutdown closes its SQLite store without waiting for that thread (see
    test_faults.py::test_shutdown_waits_for_the_round_in_progress); a round finishing then crashes (it once
    segfaulted this suite). A cancelled record is skipped by the thread: once it has taken this one off the
    queue, everything before it is done."""
    from cloud_server.records import RoundRecord
    from shared.config.round import RoundConfig

    service.queue.put(RoundRecord(round_id=-1, request=RoundConfig(), base_version=0, state="cancelled"))
    end = time.monotonic() + timeout
    while service.queue.qsize() and time.monotonic() < end:
        time.sleep(0.01)


def wait_round(stack: Stack, round_id: int, timeout: float = 60.0, durable: bool = True) -> dict[str, Any]:
    """The round's final view; for a committed round, once its version is also current at the cloud (a round
    shows "committed" a moment before its version is written and made current: see test_faults.py)."""
    client, headers = stack.clients["cloud"], bearer(stack.admin)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        view = client.get(f"/v1/rounds/{round_id}", headers=headers).json()
        if view["state"] in ("failed", "cancelled"):
            return view
        if view["state"] == "committed" and ("eval_loss" in view["metrics"] or not view["request"]["evaluate"]
                                             or "eval_error" in view["metrics"]) \
                and (not durable or client.get("/healthz").json()["version"] >= view["version"]):
            return view
        time.sleep(0.02)
    raise TimeoutError(f"round {round_id} still {view['state']} after {timeout}s")


def run_round(stack: Stack, **request: Any) -> dict[str, Any]:
    """One training round of one step (unless ``request`` says otherwise), started by the admin, to its final view."""
    r = stack.clients["cloud"].post("/v1/rounds", json={"local_steps": 1, "evaluate": False, **request},
                                    headers=bearer(stack.admin))
    assert r.status_code == 202, r.text
    return wait_round(stack, r.json()["round_id"])


@contextlib.contextmanager
def waiting_round(stack: Stack, deadline: float = 2.0) -> Iterator[int]:
    """A round the cloud is collecting reports for: the edge started it, its user never trains.

    On exit the edge's deadline drops the user; the round ends (failed, for want of participants)."""
    users = stack.edge.users
    real = users["user-0"]
    users["user-0"] = AcceptingLink()
    try:
        r = stack.clients["cloud"].post("/v1/rounds", json={"deadline": deadline, "evaluate": False},
                                        headers=bearer(stack.admin))
        assert r.status_code == 202, r.text
        rid = r.json()["round_id"]
        end = time.monotonic() + 30
        while (rid, "train") not in stack.edge.pending:
            assert time.monotonic() < end, "the edge never got the round's start"
            time.sleep(0.005)
        yield rid
    finally:
        users["user-0"] = real
    wait_round(stack, rid)
