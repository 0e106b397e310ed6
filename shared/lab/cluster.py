"""Real tier processes on loopback ports: the demo, the HTTP benchmark and the integration tests use them."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.lab.credentials import provision

ROOT = Path(__file__).resolve().parents[2]  # the repository (or site-packages) root holding shared/


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range where there is room: a port of that range may be
    taken as the source port of an outgoing connection (a health poll of a tier started before) between this pick
    and the bind of the service it is for, which then exits with "address already in use" (a bench run did)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = [random.randrange(max(1024, low // 2), low) for _ in range(32)] if low > 2048 else []
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free loopback port")


@dataclass
class Proc:
    name: str
    args: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # this process's own (its credential)
    prefix: list[str] = field(default_factory=list)  # a command it runs under (``prlimit --nofile=1024:1024``)
    popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: dict[str, str]) -> None:
        cmd = [*self.prefix, sys.executable, "-m", "shared.lab.cli", *self.args, "--port", str(self.port),
               "--log-level", "warning"]
        self.popen = subprocess.Popen(cmd, cwd=ROOT, env={**env, **self.env}, stdout=self.log.open("ab"),
                                      stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(timeout=30)

    def wait_healthy(self, timeout: float = 180.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: {self.log.read_text()[-2000:]}")
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not healthy after {timeout}s: {self.log.read_text()[-2000:]}")


@dataclass
class Cluster:
    """One cloud, E edges, C users (user i behind edge i % E, holding client i), as separate processes.

    A heterogeneous federation gives processes args of their own: ``edge_extra[e]`` (the model edge e
    serves), ``user_extra[i]`` (user i's task, cut, rank) and ``user_edge[i]`` (the edge user i registers at).

    Each process gets a credential of its own from a fresh deployment key (``<workdir>/credentials``);
    ``admin_headers`` carry the admin's. ``insecure=True`` runs them in development mode instead.
    """

    workdir: Path
    cloud_args: list[str]
    users: int = 4
    edges: int = 2
    edge_args: list[str] = field(default_factory=list)
    user_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    procs: dict[str, Proc] = field(default_factory=dict)
    insecure: bool = False
    admin_token: str = ""
    edge_extra: dict[int, list[str]] = field(default_factory=dict)
    user_extra: dict[int, list[str]] = field(default_factory=dict)
    user_edge: list[int] = field(default_factory=list)
    _client: httpx.Client | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        for name in ("SPLITLLM_TOKEN", "SPLITLLM_ADMIN_TOKEN", "SPLITLLM_CREDENTIAL", "SPLITLLM_TRUST_KEY"):
            self.env.pop(name, None)
        self.env["PYTHONPATH"] = str(ROOT)
        cloud_port = free_port()
        self.procs["cloud"] = Proc("cloud", ["cloud", "--data-dir", str(self.workdir / "cloud"),
                                             "--num-clients", str(self.users), *self.cloud_args],
                                   cloud_port, self.workdir / "cloud.log")
        for e in range(self.edges):
            self.procs[f"edge-{e}"] = Proc(f"edge-{e}", ["edge", "--cloud", self.cloud.url, "--edge-id", f"edge-{e}",
                                                         *self.edge_args, *self.edge_extra.get(e, [])],
                                           free_port(), self.workdir / f"edge-{e}.log")
        for i in range(self.users):
            edge = self.procs[f"edge-{self.user_edge[i] if self.user_edge else i % self.edges}"]
            self.procs[f"user-{i}"] = Proc(f"user-{i}", ["user", "--edge", edge.url, "--client-index", str(i),
                                                         *self.user_args, *self.user_extra.get(i, [])],
                                           free_port(), self.workdir / f"user-{i}.log")
        if self.insecure:
            for proc in self.procs.values():
                proc.args.append("--insecure-dev")
            return
        creds = provision(self.workdir / "credentials", [f"edge-{e}" for e in range(self.edges)],
                          {f"user-{i}": i for i in range(self.users)})
        self.admin_token = creds.admin_token
        for name, proc in self.procs.items():
            proc.env.update(creds.env(name))

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    @property
    def client(self) -> httpx.Client:
        """The admin's client of the cloud, kept open between calls. A new httpx client costs some 18 ms of CPU (it
        loads a TLS context), which a round's status polls every 0.3 s would take from the tiers a bench times."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.cloud.url, headers=self.admin_headers, timeout=30)
        return self._client

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    @property
    def cloud(self) -> Proc:
        return self.procs["cloud"]

    def start(self, timeout: float = 300.0) -> None:
        for p in self.procs.values():
            p.start(self.env)
        for p in self.procs.values():
            p.wait_healthy(timeout)
        end = time.monotonic() + timeout
        while self.cloud.wait_healthy()["users"] < self.users:
            if time.monotonic() > end:
                raise TimeoutError("users did not all register")
            time.sleep(0.3)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for p in self.procs.values():
            p.kill(signal.SIGTERM)

    def start_round(self, body: dict | None = None) -> int:
        r = self.client.post("/v1/rounds", json=body or {})
        r.raise_for_status()
        return r.json()["round_id"]

    def wait_round(self, round_id: int, timeout: float = 600.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            view = self.get(f"/v1/rounds/{round_id}").json()
            if view["state"] in ("committed", "failed", "cancelled") and "eval_loss" in view.get("metrics", {}) \
                    or view["state"] in ("failed", "cancelled"):
                return view
            if view["state"] == "committed" and not view["request"]["evaluate"]:
                return view
            time.sleep(0.3)
        raise TimeoutError(f"round {round_id} did not finish in {timeout}s")

    def run_round(self, body: dict, timeout: float = 3600.0) -> dict:
        """Run one round with ``body`` to its end; its final view (a RuntimeError unless it committed)."""
        view = self.wait_round(self.start_round(body), timeout=timeout)
        if view["state"] != "committed":
            raise RuntimeError(f"round {view['state']}: {view.get('error')}")
        return view


def full_row_args(model: str, split: str, data: str, seq_len: int, examples: int, seed: int = 0) -> list[str]:
    """A cloud's flags for the benches' full-length rows: texts joined to at least 8 characters a token, so that each
    row fills ``seq_len`` tokens, and ``examples`` of them a client."""
    return ["--model", model, "--split", split, "--data", data, "--seed", str(seed), "--max-len", str(seq_len),
            "--min-chars", str(8 * seq_len), "--max-examples-per-client", str(examples)]


def one_round(workdir: Path, cloud_args: list[str], body: dict, **cluster_kw) -> dict:
    """Start a cluster, run one round with ``body``, stop it; the round's final view."""
    cluster = Cluster(workdir, cloud_args, **cluster_kw)
    try:
        cluster.start()
        return cluster.run_round(body)
    finally:
        cluster.stop()
