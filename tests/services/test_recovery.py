"""An edge that restarts loses its users' registrations: real processes show that a user with a heartbeat notices
and registers again, that one without it is dropped with the real cause named in the round, and that rounds go on."""

from __future__ import annotations

import time

import pytest

from shared.lab.cluster import Cluster

pytestmark = pytest.mark.slow  # about a minute of real processes: in make test-slow

CLOUD_ARGS = ["--model", "tiny-bert", "--split", "1,3", "--data", "trec", "--local-steps", "2", "--batch-size", "4",
              "--max-examples-per-client", "16", "--eval-examples-per-client", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("recovery"), CLOUD_ARGS, users=2, edges=1)
    c.procs["user-0"].args += ["--heartbeat", "1"]  # checks every second that its edge still knows it
    c.procs["user-1"].args += ["--heartbeat", "0"]  # never checks: stays unknown to a restarted edge
    c.start()
    yield c
    c.stop()


def edge_users(cluster: Cluster) -> int:
    return cluster.procs["edge-0"].wait_healthy().get("users", -1)


def test_users_re_register_with_a_restarted_edge_and_rounds_name_who_could_not(cluster) -> None:
    first = cluster.wait_round(cluster.start_round({"evaluate": False}))
    assert first["state"] == "committed", first

    edge = cluster.procs["edge-0"]
    edge.kill()  # SIGKILL: its registrations are gone with it
    edge.start(cluster.env)
    edge.wait_healthy()
    end = time.monotonic() + 60
    while edge_users(cluster) < 1:  # user-0's heartbeat finds the edge has forgotten it, and registers again
        assert time.monotonic() < end, "user-0 did not register again with the restarted edge"
        time.sleep(0.5)
    assert edge_users(cluster) == 1  # user-1 does not check, so the edge does not know it

    both = cluster.wait_round(cluster.start_round({"evaluate": False, "min_participants": 2}))
    assert both["state"] == "failed", both
    assert "user-1" in both["error"] and "did the edge restart" in both["error"], both["error"]
    assert "did the edge restart" in both["metrics"]["drop_reasons"]["user-1"]
    assert both["progress"] == {"user-0": "reported", "user-1": "dropped"}  # done and dead told apart

    one = cluster.wait_round(cluster.start_round({"evaluate": False}))
    assert one["state"] == "committed", one
    assert one["metrics"]["users"].keys() == {"user-0"}
    assert "did the edge restart" in one["metrics"]["drop_reasons"]["user-1"]
