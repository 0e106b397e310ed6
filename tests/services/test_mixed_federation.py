"""A mixed federation as real processes over REST: two base models (tiny-bert serving TREC and SMS spam, tiny-llama
serving sentiment), three tasks, users at different cuts and ranks; one round commits with per-task metrics."""

from __future__ import annotations

import json

import httpx
import pytest
from safetensors.torch import load

from shared.lab.cluster import Cluster

DEPLOYMENTS = [{"model": "tiny-llama", "split": "1,3", "data": "sentiment", "rank": 8}]
CLOUD_ARGS = ["--model", "tiny-bert", "--split", "1,3", "--data", "trec,sms_spam", "--deployments",
              json.dumps(DEPLOYMENTS), "--local-steps", "2", "--batch-size", "2", "--max-examples-per-client", "8",
              "--eval-examples-per-client", "4", "--seed", "7"]
# user -> (edge, its own flags): two tasks behind the tiny-bert edge, one behind the tiny-llama edge
USERS = {0: (0, ["--data", "trec"]), 1: (0, ["--data", "sms_spam", "--max-blocks", "0", "--rank", "4"]),
         2: (1, ["--model", "tiny-llama", "--data", "sentiment", "--max-blocks", "2"]),
         3: (1, ["--data", "sentiment", "--rank", "2"])}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny):
    tiny("tiny-bert"), tiny("tiny-llama")  # generated into this session's cache, which the processes inherit
    c = Cluster(tmp_path_factory.mktemp("mixed"), CLOUD_ARGS, users=len(USERS), edges=2,
                edge_extra={0: ["--model", "tiny-bert"], 1: ["--model", "tiny-llama"]},
                user_edge=[USERS[i][0] for i in range(len(USERS))],
                user_extra={i: flags for i, (_, flags) in USERS.items()})
    c.start()
    yield c
    c.stop()


def test_a_mixed_federation_commits_a_round_over_rest(cluster: Cluster) -> None:
    spec = cluster.get("/v1/spec").json()
    assert [d["name"] for d in spec["deployments"]] == ["tiny-bert", "tiny-llama"]
    view = cluster.wait_round(cluster.start_round({}), timeout=900)
    assert view["state"] == "committed", view.get("error")
    tasks = view["metrics"]["tasks"]
    assert sorted(tasks) == ["tiny-bert/sms_spam", "tiny-bert/trec", "tiny-llama/sentiment"]
    assert all(0.0 <= t["eval_accuracy"] <= 1.0 for t in tasks.values())
    assert sorted(view["metrics"]["users"]) == [f"user-{i}" for i in range(len(USERS))]
    r = cluster.get("/v1/adapters/1")
    assert r.status_code == 200
    keys = load(r.content).keys()
    for prefix in ("user/tiny-bert/", "edge/tiny-bert/", "cloud/tiny-bert/trec/head.", "cloud/tiny-bert/sms_spam/head.",
                   "edge/tiny-llama/", "cloud/tiny-llama/head."):
        assert any(k.startswith(prefix) for k in keys), prefix


def test_each_user_holds_the_blocks_of_the_cut_the_cloud_assigned_it(cluster: Cluster) -> None:
    expected = {0: ("trec", 1, 8, [0]), 1: ("sms_spam", 0, 4, []), 2: ("sentiment", 2, 8, [0, 1]),
                3: ("sentiment", 1, 2, [0])}
    for i, (data, cut, rank, blocks) in expected.items():
        status = httpx.get(f"{cluster.procs[f'user-{i}'].url}/v1/status", headers=cluster.admin_headers, timeout=30)
        assert status.status_code == 200, status.text
        assert status.json()["placement"] == {"data": data, "cut": cut, "rank": rank}
        assert status.json()["blocks"] == blocks


def test_h2tune_runs_in_the_services_and_shares_middle_matrices_only(cluster: Cluster) -> None:
    # aligned by representation similarity: the cloud probes both base models (shared.fl.probe)
    round_id = cluster.start_round({"algorithm": "h2tune", "config": {"keep": 0.5, "alignment": "similarity"}})
    assert round_id % 2 == 0  # an even round: H2Tune's shared phase (odd rounds train the task part)
    view = cluster.wait_round(round_id, timeout=900)
    assert view["state"] == "committed", view.get("error")
    assert sorted(view["metrics"]["tasks"]) == ["tiny-bert/sms_spam", "tiny-bert/trec", "tiny-llama/sentiment"]
    keys = load(cluster.get(f"/v1/adapters/{view['version']}").content).keys()
    assert any(k.startswith("user/tiny-bert/") and k.endswith(".h2_m") for k in keys)
    assert any(k.startswith("cloud/tiny-llama/") and k.endswith(".h2_m") for k in keys)
