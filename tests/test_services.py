"""Three tiers as real processes on loopback: the HTTP path is the simulator's math, and a killed cloud loses nothing."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load

from cloud_server.store import unflatten
from shared.sim import SimConfig, Simulation
from tests.cluster import Cluster

CLOUD_ARGS = ["--model", "tiny-bert", "--split", "1,3", "--data", "trec", "--local-steps", "3", "--batch-size", "4",
              "--max-examples-per-client", "32", "--eval-examples-per-client", "8", "--seed", "7"]


def sim_config() -> SimConfig:
    return SimConfig(model="tiny-bert", data="trec", users=4, edges=2, rounds=2, split=(1, 3), local_steps=3,
                     batch_size=4, max_examples_per_client=32, eval_examples_per_client=8, seed=7, baseline_eval=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), CLOUD_ARGS)  # inherits SPLITLLM_CACHE from conftest
    c.start()
    yield c
    c.stop()


def fetch_version(cluster: Cluster, version: int) -> dict[str, dict[str, torch.Tensor]]:
    r = httpx.get(f"{cluster.cloud.url}/v1/adapters/{version}", timeout=30)
    assert r.status_code == 200
    return unflatten(load(r.content))


def test_http_rounds_equal_the_simulator(cluster):
    for expected in (1, 2):
        rid = cluster.start_round()
        view = cluster.wait_round(rid)
        assert view["state"] == "committed", view
        assert view["version"] == expected
    served = fetch_version(cluster, 2)
    sim = Simulation(sim_config())
    sim.run()
    for tier, state in sim.coordinator.global_state.items():
        assert set(served[tier]) == set(state)
        for key, value in state.items():
            assert torch.equal(served[tier][key], value), (tier, key, float((served[tier][key] - value).abs().max()))


def test_killed_cloud_restarts_from_its_last_committed_version(cluster):
    before = httpx.get(f"{cluster.cloud.url}/v1/rounds", timeout=30).json()
    committed = [r for r in before["rounds"] if r["state"] == "committed"]
    assert committed, "the previous test commits two rounds"
    last = max(r["version"] for r in committed)
    cluster.cloud.kill()  # SIGKILL: no shutdown hooks run
    cluster.cloud.start(cluster.env)
    cluster.cloud.wait_healthy()
    after = httpx.get(f"{cluster.cloud.url}/v1/rounds", timeout=30).json()
    assert after["version"] == last
    assert [(r["round_id"], r["state"], r["version"]) for r in after["rounds"]] == \
        [(r["round_id"], r["state"], r["version"]) for r in before["rounds"]]
    rid = cluster.start_round({"evaluate": False})
    view = cluster.wait_round(rid)
    assert view["state"] == "committed", view
    assert view["base_version"] == last and view["version"] == last + 1


@pytest.mark.parametrize("body,ctype,status", [
    (b"\xc1\xc1 not msgpack", "application/x-msgpack", 400),
    (b"{}", "application/json", 415),
])
def test_bad_bodies_get_4xx_with_a_reason(cluster, body, ctype, status):
    r = httpx.post(f"{cluster.cloud.url}/v1/step", content=body, headers={"content-type": ctype}, timeout=30)
    assert r.status_code == status
    assert r.json()["detail"]
    assert httpx.get(f"{cluster.cloud.url}/healthz", timeout=30).status_code == 200
