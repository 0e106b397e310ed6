"""Three tiers as real processes on loopback: the HTTP path is the simulator's math, a killed cloud loses nothing,
bad input gets a 4xx, and one process's credential cannot take over another's identity."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import msgpack
import pytest
import torch
from safetensors.torch import load

from shared.config.round import RoundConfig
from shared.http.credentials import Credential
from shared.lab.sim import SimConfig, Simulation
from shared.protocol.bundle import AdapterBundle
from shared.protocol.wire import CONTENT_TYPE, Message, encode
from shared.lab.cluster import Cluster
from plans import hop_bytes, ticket_bytes

LIMIT = 4_000_000
CLOUD_ARGS = ["--model", "tiny-bert", "--split", "1,3", "--data", "trec", "--local-steps", "3", "--batch-size", "4",
              "--max-examples-per-client", "32", "--eval-examples-per-client", "8", "--seed", "7",
              "--max-message-bytes", str(LIMIT)]


def sim_config() -> SimConfig:
    return SimConfig(model="tiny-bert", data="trec", users=4, edges=2, rounds=2, split=(1, 3),
                     round=RoundConfig(local_steps=3, batch_size=4), max_examples_per_client=32,
                     eval_examples_per_client=8, seed=7, baseline_eval=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), CLOUD_ARGS, edge_args=["--max-message-bytes", str(LIMIT)])  # inherits SPLITLLM_CACHE from conftest
    c.start()
    yield c
    c.stop()


def credential(cluster: Cluster, name: str) -> Credential:
    """A process's credential, as the cluster provisioned it (what an attacker who stole it would hold)."""
    return Credential.load(Path(cluster.workdir) / "credentials" / f"{name}.json")


def fetch_version(cluster: Cluster, version: int) -> AdapterBundle:
    r = cluster.get(f"/v1/adapters/{version}")
    assert r.status_code == 200
    return AdapterBundle.from_tensors(load(r.content))


def test_http_rounds_equal_the_simulator(cluster):
    views = []
    for expected in (1, 2):
        rid = cluster.start_round()
        view = cluster.wait_round(rid)
        assert view["state"] == "committed", view
        assert view["version"] == expected
        views.append(view)
    served = fetch_version(cluster, 2)
    sim = Simulation(sim_config())
    rows = sim.run()
    # every message of a round, training and evaluation, counted on each hop: the same bytes as in-process, and the
    # cloud's tickets (user i behind edge i % 2)
    by_edge = {"edge-0": ["user-0", "user-2"], "edge-1": ["user-1", "user-3"]}
    tickets = [ticket_bytes(credential(cluster, "cloud"), v, by_edge, seed=7) for v in views]
    assert [v["metrics"]["bytes"] for v in views] == [hop_bytes(r, t) for r, t in zip(rows, tickets)]
    for tier, state in sim.coordinator.global_state.items():
        assert set(served[tier]) == set(state)
        for key, value in state.items():
            assert torch.equal(served[tier][key], value), (tier, key, float((served[tier][key] - value).abs().max()))


def test_killed_cloud_restarts_from_its_last_committed_version(cluster):
    before = cluster.get("/v1/rounds").json()
    committed = [r for r in before["rounds"] if r["state"] == "committed"]
    assert committed, "the previous test commits two rounds"
    last = max(r["version"] for r in committed)
    cluster.cloud.kill()  # SIGKILL: no shutdown hooks run
    cluster.cloud.start(cluster.env)
    cluster.cloud.wait_healthy()
    after = cluster.get("/v1/rounds").json()
    assert after["version"] == last
    assert [(r["round_id"], r["state"], r["version"]) for r in after["rounds"]] == \
        [(r["round_id"], r["state"], r["version"]) for r in before["rounds"]]
    rid = cluster.start_round({"evaluate": False})
    view = cluster.wait_round(rid)
    assert view["state"] == "committed", view
    assert view["base_version"] == last and view["version"] == last + 1


def _entry(dtype: str, shape: list[int], data: bytes) -> dict:
    return {"dtype": dtype, "shape": shape, "codec": "raw", "data": data}


def _raw_step(hidden: dict) -> bytes:
    meta = {"round": 1, "user": "user-0", "step": 0, "mode": "train"}
    return msgpack.packb({"v": 1, "kind": "step", "meta": meta, "tensors": {
        "hidden": hidden, "attention_mask": _entry("uint8", [1, 2], b"\x01\x01"),
        "labels": _entry("int64", [1], bytes(8))}})


def _unknown_session() -> bytes:  # user-0's, so that both tiers let its edge and user-0 itself send it
    return encode(Message("step", {"round": 999, "user": "user-0", "step": 0, "mode": "train"}, {
        "hidden": torch.zeros(1, 2, 32), "attention_mask": torch.ones(1, 2, dtype=torch.uint8),
        "labels": torch.zeros(1, dtype=torch.int64)}))


BAD_BODIES = {
    "malformed msgpack": (b"\xc1\xc1 not msgpack", CONTENT_TYPE, 400),
    "wrong content type": (b"{}", "application/json", 415),
    "shape disagrees with bytes": (_raw_step(_entry("float32", [1, 2, 32], bytes(100))), CONTENT_TYPE, 400),
    "unknown dtype": (_raw_step(_entry("float128", [1, 2, 32], bytes(1024))), CONTENT_TYPE, 400),
    "body over the limit": (bytes(LIMIT + 1), CONTENT_TYPE, 413),
    "step for an unknown session": (_unknown_session(), CONTENT_TYPE, 404),
    "step without its tensors": (encode(Message("step", {"round": 1, "user": "user-0", "step": 0, "mode": "train"})),
                                 CONTENT_TYPE, 422),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_input_gets_4xx_with_a_json_reason_and_the_service_stays_up(cluster, case):
    body, ctype, status = BAD_BODIES[case]
    for proc, signer, audience in ((cluster.cloud, "edge-0", "cloud"),
                                   (cluster.procs["edge-0"], "user-0", "edge:edge-0")):  # each signed by its caller
        headers = {"content-type": ctype, **credential(cluster, signer).sign("POST", "/v1/step", audience, body)}
        r = httpx.post(f"{proc.url}/v1/step", content=body, headers=headers, timeout=30)
        assert r.status_code == status, (proc.name, r.text)
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
        assert httpx.get(f"{proc.url}/healthz", timeout=30).status_code == 200


def test_identity_takeover_between_real_processes_fails_and_the_victims_keep_training(cluster):
    """The issue's takeover, as processes: user-1's credential re-registers user-0 at user-0's edge, edge-1's
    re-registers edge-0 at the cloud, or tells the cloud user-0 is now behind edge-1; user-0 points its own
    registration at the metadata address. All refused; the next round has every user, none dropped."""
    edge0 = cluster.procs["edge-0"].url

    def post(url: str, path: str, payload: dict, signer: str, audience: str) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = {"content-type": "application/json", **credential(cluster, signer).sign("POST", path, audience, body)}
        return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=30)

    takeover = {"user_id": "user-0", "url": "http://127.0.0.1:9", "num_samples": 10**6}
    attempts = {
        "user-1 as user-0 at its edge": (post(edge0, "/v1/users", takeover, "user-1", "edge:edge-0"), 403),
        "edge-1 as edge-0 at the cloud": (post(cluster.cloud.url, "/v1/edges", {"edge_id": "edge-0",
                                           "url": "http://127.0.0.1:9"}, "edge-1", "cloud"), 403),
        "edge-1 claims user-0": (post(cluster.cloud.url, "/v1/edges/edge-1/users", {"user_id": "user-0",
                                  "num_samples": 10**6}, "edge-1", "cloud"), 422),
        "user-0 at the metadata address": (post(edge0, "/v1/users", {**takeover, "url": "http://169.254.169.254/"},
                                                "user-0", "edge:edge-0"), 422),
    }
    got = {name: (r.status_code, r.json().get("detail")) for name, (r, _) in attempts.items()}
    assert {name: code for name, (code, _) in got.items()} == {name: want for name, (_, want) in attempts.items()}, got
    assert cluster.cloud.wait_healthy()["users"] == cluster.users
    view = cluster.wait_round(cluster.start_round({"evaluate": False}))
    assert view["state"] == "committed" and view["metrics"]["dropped"] == [], view
    assert sorted(view["participants"]) == [f"user-{i}" for i in range(cluster.users)], view


def test_an_edge_cannot_start_a_round_the_cloud_did_not(cluster):
    """edge-1's credential, as a thief holding the edge's server (or a revoked edge) would use it, starts user-1, a
    user behind it, on a round the cloud never started: with no ticket, or with one edge-1 signed itself, user-1
    refuses (403) and its status says so; the cloud's next round, with its tickets, has every user."""
    from shared.http.tickets import issue_ticket
    from shared.protocol.messages import RoundPlan
    from shared.protocol.starts import UserStart

    user = cluster.procs["user-1"]
    plan = RoundPlan(round_id=10**6, user_id="user-1", local_steps=1000, batch_size=4, lr=1e-3)
    edge1 = credential(cluster, "edge-1")
    for ticket, reason in ((None, "no ticket from the cloud"),
                           (issue_ticket(edge1, plan, "edge-1"), "a edge credential may not be used here")):
        body = encode(UserStart(plan, {}, ticket).to_message())  # refused before its adapters matter
        headers = {"content-type": CONTENT_TYPE, **edge1.sign("POST", "/v1/start", "user:user-1", body)}
        r = httpx.post(f"{user.url}/v1/start", content=body, headers=headers, timeout=30)
        assert r.status_code == 403 and reason in r.json()["detail"], r.text
        status = httpx.get(f"{user.url}/v1/status", headers=cluster.admin_headers, timeout=30).json()
        assert status["refused_start"]["round"] == 10**6 and reason in status["refused_start"]["reason"], status
        assert str(10**6) not in str(status["jobs"]), status
    view = cluster.wait_round(cluster.start_round({"evaluate": False}))
    assert view["state"] == "committed" and view["metrics"]["dropped"] == [], view


def test_a_user_that_moved_to_another_edge_takes_the_clouds_tickets_for_its_new_edge_only(cluster):
    """user-3 restarts behind edge-0 instead of edge-1: the cloud's next rounds, training and evaluation, start it
    through edge-0 with tickets naming edge-0, which it takes. Its old edge, holding a ticket the cloud had made for
    it there (as before the move), can no longer start it."""
    from shared.http.tickets import issue_ticket
    from shared.protocol.messages import RoundPlan
    from shared.protocol.starts import UserStart

    user = cluster.procs["user-3"]
    user.kill(signal.SIGTERM)
    user.args[user.args.index("--edge") + 1] = cluster.procs["edge-0"].url
    user.start(cluster.env)
    user.wait_healthy()
    view = cluster.wait_round(cluster.start_round({}))
    assert view["state"] == "committed" and view["metrics"]["dropped"] == [] and "eval_loss" in view["metrics"], view
    assert sorted(view["participants"]) == [f"user-{i}" for i in range(cluster.users)], view
    status = httpx.get(f"{user.url}/v1/status", headers=cluster.admin_headers, timeout=30).json()
    assert status["refused_start"] is None and f"{view['round_id']}:eval" in status["jobs"], status
    plan = RoundPlan(round_id=view["round_id"] + 1, user_id="user-3", local_steps=3, batch_size=4, lr=1e-3)
    body = encode(UserStart(plan, {}, issue_ticket(credential(cluster, "cloud"), plan, "edge-1")).to_message())
    signed = credential(cluster, "edge-1").sign("POST", "/v1/start", "user:user-3", body)
    r = httpx.post(f"{user.url}/v1/start", content=body, headers={"content-type": CONTENT_TYPE, **signed}, timeout=30)
    assert r.status_code == 403 and "is not this user's edge ('edge-0')" in r.json()["detail"], r.text
