"""Faults: retried and duplicated messages, in-process (fast): a retried step is applied once and answered from the
cache (in-process and over the apps' HTTP path), retried updates and starts are no-ops, a start past
``--max-sessions`` gets 503 + Retry-After and the client's retry loop honours it; a round shows "committed" only
once durable, a failed commit keeps the version, shutdown waits for the round in progress.

Killed users, edges and clouds (real processes, ``slow``): test_killed_tiers.py.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import pytest
import torch

from shared.errors import NotFound
from shared.http.client import TransportError, with_retries
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Mode, Tier
from shared.protocol.messages import RoundPlan, Update
from shared.protocol.starts import RoundStart, UserStart
from shared.protocol.transport import InProcessLink, Link
from shared.protocol.wire import Message, decode, encode
from stack_helpers import AcceptingLink, Stack, bearer, inprocess_stack, wait_round
from user_agent.compute import step_request


# -- in-process: retries and duplicates ------------------------------------------------------------------------

def params_of(session: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in session.params.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def sim(small_sim: Any) -> Any:
    return small_sim(model="tiny-bert", data="trec", users=2, edges=1, local_steps=2, batch_size=2, max_len=16,
                     max_examples_per_client=8, eval_examples_per_client=2)


def open_round(sim: Any, round_id: int, user: str = "user-0") -> tuple[RoundPlan, dict[str, Any], Message]:
    """Sessions for (round, user) on all three tiers and the user's real first step message."""
    plan = RoundPlan(round_id=round_id, user_id=user, local_steps=3, batch_size=2, lr=5e-3, seed=0)
    state = sim.coordinator.global_state
    sessions = {t: sim.runtimes[t].open_session(plan, state[t]) for t in ("user", "edge", "cloud")}
    return plan, sessions, user_step(sim, plan, sessions["user"], 0)


def user_step(sim: Any, plan: RoundPlan, session: Any, step: int) -> Message:
    agent = next(u for u in sim.users if u.user_id == plan.user_id)
    batch = list(agent.sampler.round_batches(plan.seed, plan.round_id, plan.user_id, step + 1, plan.batch_size))[step]
    hidden = sim.runtimes["user"].forward(session, None, batch.attention_mask, step, input_ids=batch.input_ids)
    return step_request(plan, step, hidden.detach(), batch).to_message()


def test_a_retried_step_is_applied_once_and_answered_from_the_cache(sim):
    edge = sim.edges[0]
    plan, sessions, msg = open_round(sim, 50)
    initial = {t: params_of(sessions[t]) for t in ("edge", "cloud")}
    link = InProcessLink(edge, upward=True)  # every message really encoded and decoded, as over HTTP
    first = link.request("step", msg)
    after_first = {t: params_of(sessions[t]) for t in ("edge", "cloud")}
    for _ in range(3):  # the same step, retried
        again = link.request("step", msg)
        assert torch.equal(again.tensors["grad"], first.tensors["grad"]) and again.meta == first.meta
    assert sessions["edge"].steps == 1 and sessions["cloud"].steps == 1
    for t in ("edge", "cloud"):
        assert not same(initial[t], after_first[t]), f"the first step moved nothing on the {t} tier"
        assert same(after_first[t], params_of(sessions[t])), f"a retried step moved the {t} tier's adapters"
    # the next step is applied (once), and a step from the past is refused
    link.request("step", user_step(sim, plan, sessions["user"], 1))
    assert sessions["edge"].steps == 2 and sessions["cloud"].steps == 2
    with pytest.raises(ValueError, match="older than the last step"):
        edge.on_step(decode(encode(msg)))
    # the same through the cloud's handler directly (the edge's relay retried)
    relayed = Message("step", {**msg.meta, "step": 2}, dict(msg.tensors))  # the session's next step
    cloud_session = sessions["cloud"]
    sim.coordinator.on_step(decode(encode(relayed)))
    before = params_of(cloud_session)
    sim.coordinator.on_step(decode(encode(relayed)))
    assert cloud_session.steps == 3 and same(before, params_of(cloud_session))


class SlowLink(Link):
    """A link that takes ``delay`` seconds before it forwards (a slow cloud)."""

    def __init__(self, inner: Link, delay: float) -> None:
        self.inner, self.delay, self.upward, self.stats = inner, delay, inner.upward, inner.stats

    def request(self, endpoint: str, msg: Message) -> Message:
        time.sleep(self.delay)
        return self.inner.request(endpoint, msg)


def test_a_duplicate_step_arriving_during_the_first_is_applied_once(sim):
    edge = sim.edges[0]
    plan, sessions, msg = open_round(sim, 60)
    real = edge.cloud
    edge.cloud = SlowLink(real, 0.4)
    replies: list[Any] = []
    errors: list[str] = []

    def attempt() -> None:
        try:
            replies.append(edge.on_step(decode(encode(msg))))
        except Exception as exc:  # over HTTP: a 500 (RuntimeError is not mapped) or a 4xx
            errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")

    try:
        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(30)
    finally:
        edge.cloud = real
    assert errors == [] and len(replies) == 2, errors
    assert (sessions["edge"].steps, sessions["cloud"].steps) == (1, 1)
    assert torch.equal(replies[0].tensors["grad"], replies[1].tensors["grad"])


class Recorder(Link):
    """The cloud as the edge sees it: records the edge's reports."""

    def __init__(self) -> None:
        self.upward, self.stats, self.calls = True, None, []

    def request(self, endpoint: str, msg: Message) -> Message:
        self.calls.append((endpoint, decode(encode(msg))))
        return Message("ok")


@contextmanager
def recorded_round(sim, rid: int) -> Iterator[tuple[Any, Recorder, Any]]:
    """Edge 0 of ``sim`` started on training round ``rid`` for user-0 and user-1 (stand-in users that accept their
    starts), its reports to the cloud recorded: (the edge, the recorder, the global state the round started from)."""
    edge = sim.edges[0]
    plans = [RoundPlan(round_id=rid, user_id=u, local_steps=1, batch_size=2, lr=5e-3) for u in ("user-0", "user-1")]
    state = sim.coordinator.global_state
    download = AdapterBundle({t: state[t] for t in (Tier.USER, Tier.EDGE)})
    real_users, real_cloud = dict(edge.users), edge.cloud
    edge.users.update({u: AcceptingLink() for u in ("user-0", "user-1")})
    edge.cloud = recorder = Recorder()
    try:
        edge.on_start(RoundStart(plans, download).to_message())
        yield edge, recorder, state
    finally:
        edge.users.clear()
        edge.users.update(real_users)
        edge.cloud = real_cloud


def test_retried_user_updates_are_counted_once(sim):
    rid = 70
    with recorded_round(sim, rid) as (edge, recorder, state):

        def update(user: str, delta: float, n: int) -> Message:
            return Update(rid, user, Mode.TRAIN, n, {"train_loss": 1.0},
                          {k: v + delta for k, v in state["user"].items()}).to_message()

        def deliver(msg: Message) -> None:  # as a transport does: the handler, then its after-reply hook
            msg = decode(encode(msg))
            edge.on_update(msg)
            edge.after_update(msg)

        for _ in range(3):
            deliver(update("user-0", 0.1, 10))
        pending = edge.pending[(rid, "train")]
        assert list(pending.metrics) == ["user-0"] and len(pending.user_updates) == 1
        assert len(pending.edge_updates) == 1
        assert recorder.calls == []
        deliver(update("user-1", -0.1, 30))
        try:  # the edge has reported: a late retry must not produce a second report
            deliver(update("user-1", -0.1, 30))
        except NotFound:
            pass  # (today: 404 "no train round 70 expects user-1")
    assert len(recorder.calls) == 1
    endpoint, report = recorder.calls[0]
    assert endpoint == "update" and report.meta["num_samples"] == 40
    assert sorted(report.meta["metrics"]) == ["user-0", "user-1"]
    for k, v in state["user"].items():  # sample-weighted: (10 * (v + .1) + 30 * (v - .1)) / 40 = v - .05
        assert torch.allclose(report.tensors[f"user/{k}"], v - 0.05, atol=1e-6), k



def test_a_start_retried_after_the_edge_reported_is_a_no_op(sim):
    edge = sim.edges[0]
    starts: list[Message] = []
    real_on_start = edge.on_start
    edge.on_start = lambda msg: starts.append(msg) or real_on_start(msg)  # the coordinator's InProcessLink calls this
    user_starts: list[str] = []
    for agent in sim.users:
        agent.on_start = (lambda a, real: lambda msg: user_starts.append(a.user_id) or real(msg))(agent, agent.on_start)
    row = sim.run_round(sim.request(evaluate=False))
    assert row["version"] == 1 and len(user_starts) == 2
    train_start = next(m for m in starts if m.meta["plans"][0]["mode"] == "train")
    try:
        real_on_start(decode(encode(train_start)))
    except Exception:
        pass
    assert len(user_starts) == 2, f"users started again: {user_starts[2:]}"


# -- over the apps' HTTP path ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("faults")) as s:
        yield s


def test_a_retried_step_over_http_gets_the_same_reply_and_is_applied_once(stack):
    rid = 500
    sessions = stack.open_sessions(rid)
    initial = {t: params_of(s) for t, s in sessions.items()}
    body = encode(stack.step_message(rid, 0))
    first = stack.post_msg("edge", "step", body)
    assert first.status_code == 200, first.text
    after_first = {t: params_of(s) for t, s in sessions.items()}
    for _ in range(3):
        again = stack.post_msg("edge", "step", body)
        assert again.status_code == 200 and again.content == first.content
    for t, s in sessions.items():
        assert s.steps == 1 and s.last_step == 0, t
        assert not same(initial[t], after_first[t]) and same(after_first[t], params_of(s)), t
    # the next step is applied once more; then a step from the past is refused
    assert stack.post_msg("edge", "step", encode(stack.step_message(rid, 1, seed=1))).status_code == 200
    assert all(s.steps == 2 for s in sessions.values())
    old = stack.post_msg("edge", "step", body)
    assert old.status_code == 422 and "older than the last step" in old.json()["detail"]
    # the edge's relay retried at the cloud: same answer, applied once
    cloud_session = stack.open_sessions(rid + 1, tiers=("cloud",))["cloud"]
    relay = encode(stack.step_message(rid + 1, 0, seed=2))
    a = stack.post_msg("cloud", "step", relay)
    before = params_of(cloud_session)
    b = stack.post_msg("cloud", "step", relay)
    assert a.status_code == b.status_code == 200 and a.content == b.content
    assert cloud_session.steps == 1 and same(before, params_of(cloud_session))


def test_a_retried_start_at_the_edge_is_a_no_op_while_the_round_runs(stack):
    users = stack.edge.users
    real = users["user-0"]
    users["user-0"] = counting = AcceptingLink()
    try:
        start = encode(stack.edge_start([stack.plan(510)]))
        replies = [stack.post_msg("edge", "start", start) for _ in range(3)]
        assert [r.status_code for r in replies] == [200, 200, 200]
        assert [e for e, _ in counting.calls] == ["start"], "a retried start started the user again"
        assert sum(1 for k in stack.edge.runtime.sessions if k[0] == 510) == 1
    finally:
        users["user-0"] = real


def test_a_retried_start_at_the_user_is_a_no_op(stack, monkeypatch):
    runs: list[Any] = []

    def run(start: UserStart, key: str) -> None:  # the device's part of the round, in the thread a start begins
        runs.append(start.plan.round_id)
        stack.user.jobs[key] = "reported"

    monkeypatch.setattr(stack.user, "_run", run)
    plan = stack.plan(520)
    start = encode(UserStart(plan, stack.cloud.coordinator.global_state[Tier.USER], stack.ticket(plan)).to_message())
    replies = [stack.post_msg("user", "start", start) for _ in range(2)]
    assert [r.status_code for r in replies] == [202, 202]
    assert [decode(r.content).kind for r in replies] == ["accepted", "accepted"]
    time.sleep(0.3)
    assert runs == [520], f"the device ran round 520 {len(runs)} times"


def test_a_start_past_max_sessions_gets_503_with_retry_after(stack):
    edge = stack.edge
    users = edge.users
    real_users, real_limit = users["user-0"], edge.max_sessions
    users["user-0"] = counting = AcceptingLink()
    edge.max_sessions = 1
    try:
        stack.open_sessions(530, user="someone-else", tiers=("edge",))  # the one session the edge may hold
        start = encode(stack.edge_start([stack.plan(530)]))
        r = stack.post_msg("edge", "start", start)
        assert r.status_code == 503, r.text
        assert float(r.headers["retry-after"]) > 0 and "limit of 1" in r.json()["detail"]
        assert (530, "train") not in edge.pending and counting.calls == [], "a refused start left state behind"
        edge.runtime.close_session(530, "someone-else")
        r = stack.post_msg("edge", "start", start)
        assert r.status_code == 200, r.text
        assert [e for e, _ in counting.calls] == ["start"]
    finally:
        users["user-0"], edge.max_sessions = real_users, real_limit


COMMIT_ORDER = ("cloud_server/rounds.py Coordinator.run_round sets record.state = 'committed' and record.version "
                "BEFORE store.commit(...) and before self.version / self.global_state are updated")


def test_a_round_shows_committed_only_once_durable(tmp_path):
    with inprocess_stack(tmp_path) as s:
        store, client = s.cloud.store, s.clients["cloud"]
        real_commit = store.commit
        store.commit = lambda record, state: time.sleep(0.5) or real_commit(record, state)  # a slow disk
        rid = client.post("/v1/rounds", json={"local_steps": 1, "evaluate": False},
                          headers=bearer(s.admin)).json()["round_id"]
        end = time.monotonic() + 60
        while (view := client.get(f"/v1/rounds/{rid}", headers=bearer(s.admin)).json())["state"] != "committed":
            assert view["state"] not in ("failed", "cancelled") and time.monotonic() < end, view
            time.sleep(0.01)
        seen = {"adapters": client.get(f"/v1/adapters/{view['version']}", headers=bearer(s.admin)).status_code,
                "current": client.get("/healthz").json()["version"]}
        while client.get("/healthz").json()["version"] < view["version"] and time.monotonic() < end:
            time.sleep(0.02)  # let the commit finish before the stack closes
        assert seen == {"adapters": 200, "current": view["version"]}, (view["version"], seen)


def test_a_failed_commit_fails_the_round_and_keeps_the_version(tmp_path):
    with inprocess_stack(tmp_path) as s:
        store, client = s.cloud.store, s.clients["cloud"]
        real_commit = store.commit

        def disk_full(record: Any, state: Any) -> None:
            raise OSError(28, "No space left on device")

        store.commit = disk_full
        first = wait_round(s, client.post("/v1/rounds", json={"local_steps": 1, "evaluate": False},
                                          headers=bearer(s.admin)).json()["round_id"], durable=False)
        store.commit = real_commit
        second = wait_round(s, client.post("/v1/rounds", json={"local_steps": 1, "evaluate": False},
                                           headers=bearer(s.admin)).json()["round_id"], durable=False)
        history = [(r["round_id"], r["state"], r["version"])
                   for r in client.get("/v1/rounds", headers=bearer(s.admin)).json()["rounds"]]
        assert (first["state"], first["version"]) == ("failed", None), (first["state"], first["version"],
                                                                        first["metrics"].get("eval_error"), history)
        assert second["version"] == 1 and [v for _, st, v in history if st == "committed"] == [1], history


def test_shutdown_waits_for_the_round_in_progress(tmp_path, monkeypatch):
    errors: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(f"{args.exc_type.__name__}: "
                                                                             f"{args.exc_value}"))
    with inprocess_stack(tmp_path, drain=False) as s:
        store, client = s.cloud.store, s.clients["cloud"]
        real_save = store.save_round

        def slow_final_save(record: dict[str, Any]) -> None:
            if record["state"] == "committed":
                time.sleep(0.5)  # the round's last write, still under way when the service shuts down
            real_save(record)

        store.save_round = slow_final_save
        rid = client.post("/v1/rounds", json={"local_steps": 1, "evaluate": False},
                          headers=bearer(s.admin)).json()["round_id"]
        wait_round(s, rid)
    time.sleep(1.0)
    assert errors == []


def test_the_client_retries_503_and_unreachable_peers_until_its_deadline():
    calls: list[float] = []

    def busy_twice() -> httpx.Response:
        calls.append(time.monotonic())
        return httpx.Response(503, headers={"retry-after": "0.2"}) if len(calls) < 3 else httpx.Response(200)

    assert with_retries(busy_twice, deadline=10).status_code == 200
    assert len(calls) == 3 and calls[1] - calls[0] >= 0.09  # waited about Retry-After (0.5x-1.5x jitter)

    t0 = time.monotonic()
    always_busy = with_retries(lambda: httpx.Response(503, headers={"retry-after": "0.1"}), deadline=0.6)
    assert always_busy.status_code == 503 and 0.5 <= time.monotonic() - t0 < 3

    refused = []

    def refuse() -> httpx.Response:
        refused.append(1)
        raise httpx.ConnectError("connection refused")

    with pytest.raises(TransportError, match="could not reach peer"):
        with_retries(refuse, deadline=0.5, base_delay=0.05)
    assert len(refused) >= 2

    not_retried = []
    assert with_retries(lambda: not_retried.append(1) or httpx.Response(404), deadline=10).status_code == 404
    assert not_retried == [1]


def test_the_report_waits_until_every_update_taken_in_was_counted(sim):
    """Two users' updates handled in one order and counted by the transport in the other (two HTTP requests whose
    threads resume in either order): the report goes with the last count, so its bytes hold both updates."""
    rid = 71
    with recorded_round(sim, rid) as (edge, recorder, state):
        updates = {u: decode(encode(Update(rid, u, Mode.TRAIN, 10, {"train_loss": 1.0}, dict(state["user"]))
                                    .to_message())) for u in ("user-0", "user-1")}
        edge.on_update(updates["user-0"])
        edge.on_update(updates["user-1"])  # settles the round
        edge.ledger.add((rid, "train"), 100, 10)  # the transport counts user-1's update first ...
        edge.after_update(updates["user-1"])
        assert recorder.calls == []  # ... user-0's is not counted yet
        edge.ledger.add((rid, "train"), 100, 10)
        edge.after_update(updates["user-0"])
    assert len(recorder.calls) == 1
    assert recorder.calls[0][1].meta["bytes"] == {"up": 200, "down": 20}


def test_a_start_waits_for_a_listed_users_registration_under_way(sim):
    """The cloud knows a user once it has answered the edge's registration, before the edge has loaded the user's
    blocks and added it: a start arriving in between used to skip the user (neither started nor dropped), and the
    round waited for it forever. Now the start waits for the registration and starts the user."""
    edge = sim.edges[0]
    plans = [RoundPlan(round_id=7, user_id=u, local_steps=1, batch_size=2, lr=5e-3) for u in ("user-0", "user-1")]
    state = sim.coordinator.global_state
    download = AdapterBundle({t: state[t] for t in (Tier.USER, Tier.EDGE)})
    real_users, real_cloud = dict(edge.users), edge.cloud
    edge.users.clear()
    edge.users["user-0"] = first = AcceptingLink()
    edge.cloud = Recorder()
    late = AcceptingLink()
    registered = threading.Event()

    def register_late() -> None:
        with edge.arriving_user("user-1"):
            registered.wait(5)
            time.sleep(0.2)  # the start is waiting by now
            edge.register_user("user-1", late, 8)

    thread = threading.Thread(target=register_late)
    try:
        thread.start()
        while "user-1" not in edge.arriving:
            time.sleep(0.01)
        registered.set()
        edge.on_start(RoundStart(plans, download).to_message())
        thread.join(5)
        assert [e for e, _ in first.calls] == ["start"] and [e for e, _ in late.calls] == ["start"]
        assert not edge.pending[(7, Mode.TRAIN)].missing
    finally:
        edge.pending.pop((7, Mode.TRAIN), None)
        edge.runtime.drop_sessions(keep=lambda k: k[0] != 7)
        edge.users.clear()
        edge.users.update(real_users)
        edge.cloud = real_cloud


def test_a_start_drops_a_listed_user_the_edge_does_not_know(sim):
    """Started or dropped, never neither: the round is reported without the user, with the reason."""
    edge = sim.edges[0]
    plans = [RoundPlan(round_id=8, user_id="user-9", local_steps=1, batch_size=2, lr=5e-3)]
    state = sim.coordinator.global_state
    real_cloud = edge.cloud
    edge.cloud = recorder = Recorder()
    try:
        edge.on_start(RoundStart(plans, AdapterBundle({t: state[t] for t in (Tier.USER, Tier.EDGE)})).to_message())
        (endpoint, report), = recorder.calls
        assert endpoint == "update" and "not registered" in str(report.meta)
    finally:
        edge.cloud = real_cloud
