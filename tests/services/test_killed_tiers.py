"""Faults with real processes (``slow``): one cloud, two edges and four users (shared.lab.cluster.Cluster).

SIGKILL a user mid-round (the round commits without it, or fails when everyone is needed), SIGKILL and restart the
cloud mid-round (the round is failed at start-up, history stays, the next round continues from the last version),
SIGKILL an edge mid-round (its users are dropped after the deadline plus the cloud's grace). The retried and
duplicated messages of the default suite are in test_faults.py.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any, Iterator

import pytest

FAULT_ARGS = ["--model", "tiny-bert", "--split", "1,3", "--data", "trec", "--local-steps", "3", "--batch-size", "4",
              "--max-examples-per-client", "32", "--eval-examples-per-client", "8", "--max-len", "32", "--seed", "7"]
STEPS = 100  # a round of ~4 s with four users on this machine
DEADLINE = 15.0  # seconds: comfortably past the time the survivors need


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from shared.lab.cluster import Cluster

    c = Cluster(tmp_path_factory.mktemp("faults-cluster"), FAULT_ARGS, users=4, edges=2)
    c.start()
    rid = c.start_round({"evaluate": False})  # some committed history to protect
    assert settle(c, rid)["state"] == "committed"
    yield c
    c.stop()


def rounds(cluster: Any) -> dict[int, dict[str, Any]]:
    return {r["round_id"]: r for r in cluster.get("/v1/rounds").json()["rounds"]}


KEPT = ("round_id", "state", "version", "base_version", "request", "participants", "metrics", "error")


def committed(cluster: Any) -> dict[int, dict[str, Any]]:
    """The committed rounds as the API shows them (the fields a restart must not change)."""
    return {rid: {k: r[k] for k in KEPT} for rid, r in rounds(cluster).items() if r["state"] == "committed"}


def adapter_files(cluster: Any) -> dict[int, bytes]:
    out = {}
    for r in committed(cluster).values():
        resp = cluster.get(f"/v1/adapters/{r['version']}")
        assert resp.status_code == 200
        out[r["version"]] = resp.content
    return out


def version(cluster: Any) -> int:
    return cluster.get("/v1/rounds").json()["version"]


def settle(cluster: Any, rid: int, timeout: float = 600.0) -> dict[str, Any]:
    """Cluster.wait_round, then (for a committed round) until its version is current at the cloud: a round shows
    "committed" a moment before its version is durable (see
    test_faults.py::test_a_round_shows_committed_only_once_durable)."""
    view = cluster.wait_round(rid, timeout)
    end = time.monotonic() + 60
    while view["state"] == "committed" and version(cluster) < view["version"]:
        assert time.monotonic() < end, "a committed round's version never became current"
        time.sleep(0.05)
    return view


def wait_training(cluster: Any, rid: int, user: str, min_step: int = 5, timeout: float = 120.0) -> str:
    """Until the cloud's progress shows ``user`` at least ``min_step`` steps into the round."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        progress = cluster.get(f"/v1/rounds/{rid}").json()["progress"].get(user, "")
        m = re.match(r"train step (\d+)/", progress)
        if m and int(m.group(1)) >= min_step:
            return progress
        time.sleep(0.1)
    raise TimeoutError(f"{user} never trained in round {rid}: {progress!r}")


def restart(cluster: Any, name: str) -> None:
    proc = cluster.procs[name]
    proc.kill(signal.SIGKILL)
    proc.start(cluster.env)
    proc.wait_healthy()


def round_body(**extra: Any) -> dict[str, Any]:
    return {"local_steps": STEPS, "deadline": DEADLINE, "evaluate": False, **extra}


@pytest.mark.slow
def test_killed_user_fails_a_round_that_needs_every_user(cluster):
    base, history, files = version(cluster), committed(cluster), adapter_files(cluster)
    rid = cluster.start_round(round_body(min_participants=4))
    wait_training(cluster, rid, "user-3")
    cluster.procs["user-3"].kill(signal.SIGKILL)
    try:
        view = settle(cluster, rid)
        assert view["state"] == "failed" and view["version"] is None, view
        assert "min_participants=4" in view["error"] and "3 of 4" in view["error"], view["error"]
        assert version(cluster) == base and cluster.get(f"/v1/adapters/{base + 1}").status_code == 404
        assert committed(cluster) == history and adapter_files(cluster) == files
    finally:  # the next tests need every device, whatever this one found
        restart(cluster, "user-3")


@pytest.mark.slow
def test_killed_user_is_dropped_and_the_round_commits_with_the_others(cluster):
    base, history, files = version(cluster), committed(cluster), adapter_files(cluster)
    rid = cluster.start_round(round_body(min_participants=3))
    wait_training(cluster, rid, "user-3")
    cluster.procs["user-3"].kill(signal.SIGKILL)
    try:
        view = settle(cluster, rid)
        assert view["state"] == "committed", view
        assert view["metrics"]["dropped"] == ["user-3"]
        assert sorted(view["metrics"]["users"]) == ["user-0", "user-1", "user-2"]
        assert view["progress"]["user-3"] == "dropped"
        assert view["base_version"] == base and view["version"] == base + 1 == version(cluster)
        after = committed(cluster)
        assert {k: v for k, v in after.items() if k != rid} == history
        new_files = adapter_files(cluster)
        assert {v: b for v, b in new_files.items() if v <= base} == files and base + 1 in new_files
    finally:
        restart(cluster, "user-3")
    # the device is back: the next round has everyone again
    rid = cluster.start_round({"local_steps": 3, "evaluate": False})
    view = settle(cluster, rid)
    assert view["state"] == "committed" and view["metrics"]["dropped"] == [], view


@pytest.mark.slow
def test_killed_cloud_fails_the_running_round_and_the_next_continues_from_the_last_version(cluster):
    base, history, files = version(cluster), committed(cluster), adapter_files(cluster)
    rid = cluster.start_round(round_body())
    wait_training(cluster, rid, "user-0")
    cluster.cloud.kill(signal.SIGKILL)
    cluster.cloud.start(cluster.env)
    health = cluster.cloud.wait_healthy()
    assert (health["version"], health["edges"], health["users"]) == (base, 2, 4), health  # topology from SQLite
    after = rounds(cluster)
    assert after[rid]["state"] == "failed" and after[rid]["version"] is None, after[rid]
    assert "restarted" in after[rid]["error"], after[rid]["error"]
    assert committed(cluster) == history and adapter_files(cluster) == files
    assert version(cluster) == base
    # the edges and users stayed up; the next round starts from the last committed version
    nxt = cluster.start_round({"local_steps": 3})
    assert nxt == rid + 1
    view = settle(cluster, nxt)
    assert view["state"] == "committed", view
    assert view["base_version"] == base and view["version"] == base + 1
    assert view["metrics"]["dropped"] == [] and "eval_loss" in view["metrics"]


@pytest.mark.slow
def test_killed_edge_drops_its_users_and_the_round_commits_with_the_other_edge(cluster):
    base, history = version(cluster), committed(cluster)
    deadline = 10.0
    t0 = time.monotonic()
    rid = cluster.start_round(round_body(deadline=deadline, min_participants=2))
    wait_training(cluster, rid, "user-1")
    cluster.procs["edge-1"].kill(signal.SIGKILL)
    view = settle(cluster, rid, timeout=deadline + 30 + 120)
    took = time.monotonic() - t0
    assert view["state"] == "committed", view
    assert view["metrics"]["dropped"] == ["user-1", "user-3"]
    assert sorted(view["metrics"]["users"]) == ["user-0", "user-2"]
    assert view["version"] == base + 1 and version(cluster) == base + 1
    assert {k: v for k, v in committed(cluster).items() if k != rid} == history
    assert took >= deadline, took  # it waited for the dead edge: deadline + the cloud's grace (30 s)
    # the surviving edge's users go on training
    rid = cluster.start_round({"local_steps": 3, "evaluate": False, "participants": ["user-0", "user-2"]})
    view = settle(cluster, rid)
    assert view["state"] == "committed" and view["version"] == base + 2, view
