"""The compose topology under a real Docker engine (``make test-compose``): the image built offline, one cloud,
two edges and four users, a round started over REST from the host; its per-hop bytes equal the simulator's plus the
cloud's round tickets, and each user's link is shaped to its profile, measured inside the containers. Skips where no
engine starts."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from plans import hop_bytes, ticket_bytes
from shared.config.round import RoundConfig
from shared.http.credentials import Credential
from shared.lab.cluster import free_port
from shared.lab.compose import CREDENTIALS, ComposeError, Deployment, compose_command, engine_problem
from shared.lab.sim import SimConfig, Simulation
from shared.lab.topology import measure_rate
from shared.protocol.links import get_profile

pytestmark = pytest.mark.compose

ROUND = {"local_steps": 5}  # the compose cloud's settings otherwise: minilm-l6, split 1,3, trec, 4 clients


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compose")
    problem = engine_problem(workdir)
    if problem:
        pytest.skip(f"no Docker engine here: {problem}")
    try:
        compose_command()
    except ComposeError as exc:
        pytest.skip(str(exc))
    dep = Deployment(workdir, project="splitllm-test", port=free_port())
    dep.build()
    try:
        dep.up()
        yield dep
    finally:
        dep.down()


def in_container(container: str, *cmd: str) -> list[str]:
    return ["docker", "exec", container, *cmd]


def test_a_round_commits_with_the_simulators_per_hop_bytes(deployment) -> None:
    view = deployment.wait_round(deployment.start_round(ROUND))
    assert view["state"] == "committed", view
    assert view["version"] == 1 and "eval_accuracy" in view["metrics"]
    sim = Simulation(SimConfig(model="minilm-l6", data="trec", users=4, edges=2, rounds=1, split=(1, 3),
                               round=RoundConfig(**ROUND), baseline_eval=False))
    row = sim.run()[0]
    # the same bytes, and the cloud's tickets down each hop (the simulator has no credentials: it sends none)
    tickets = ticket_bytes(Credential.load(CREDENTIALS / "cloud.json"), view,
                           {"edge-0": ["user-0", "user-2"], "edge-1": ["user-1", "user-3"]}, seed=0)
    assert view["metrics"]["bytes"] == hop_bytes(row, tickets)


def test_a_users_link_is_shaped_to_its_profile(deployment) -> None:
    """user-0 (4g) to edge-0: tbf on the user's eth0 at the uplink rate; back, the user's ifb0 at the downlink rate."""
    profile = get_profile("4g")
    user, edge = deployment.container("user-0"), deployment.container("edge-0")
    up = measure_rate(user, edge, "edge-0", 3_000_000, python="python", wrap=in_container)
    down = measure_rate(edge, user, "user-0", 6_000_000, python="python", wrap=in_container)
    assert 0.8 * profile.up_mbps < up < 1.1 * profile.up_mbps, up
    assert 0.8 * profile.down_mbps < down < 1.1 * profile.down_mbps, down


SERVICES = ("cloud", "edge-0", "edge-1", "user-0", "user-1", "user-2", "user-3")


def test_each_container_holds_only_its_own_credential(deployment) -> None:
    """Inside each running container: its own credential and the trust key, mounted and in the tier's copies
    (owned by uid 10001, 0400), and no other file of compose/credentials anywhere on its file system."""
    def sh(container: str, script: str) -> str:
        return subprocess.run(in_container(container, "sh", "-c", script), capture_output=True, text=True,
                              timeout=60, check=True).stdout

    host = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in CREDENTIALS.iterdir()}
    for service in SERVICES:
        container = deployment.container(service)
        files = sorted(sh(container, "find /credentials /run/splitllm -type f").split())
        assert files == ["/credentials/credential.json", "/credentials/deployment.pub",
                         "/run/splitllm/credential.json", "/run/splitllm/deployment.pub"], (service, files)
        for path, name in (("/credentials/credential.json", f"{service}.json"),
                           ("/run/splitllm/credential.json", f"{service}.json"),
                           ("/run/splitllm/deployment.pub", "deployment.pub")):
            assert sh(container, f"sha256sum {path}").split()[0] == host[name], (service, path)
        assert sh(container, "stat -c '%u %a' /run/splitllm/credential.json").split() == ["10001", "400"]
        others = {n for n in host if n not in (f"{service}.json", "deployment.pub")}
        found = sh(container, "find / -xdev -type f \\( " + " -o ".join(f"-name {n}" for n in sorted(others))
                   + " \\) 2>/dev/null || true")
        assert not found.strip(), (service, found)
