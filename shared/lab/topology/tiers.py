"""The tier processes: their flags, commands and environment; starting them, waiting until ready, killing them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.lab.topology.network import State, in_ns, run
from shared.lab.topology.plan import PORTS, Plan, TopologyError, parent_addr

ROOT = Path(__file__).resolve().parents[3]  # the directory holding shared/


@dataclass
class TierArgs:
    """The flags given to ``up`` beyond its own, sorted by the tiers they go to."""

    cloud: list[str] = field(default_factory=list)  # cloud-only settings (and --config)
    common: list[str] = field(default_factory=list)  # settings every tier has, given to every tier
    env: dict[str, str] = field(default_factory=dict)  # tokens travel in the environment, not in argv
    scheme: str = "http"
    insecure_dev: bool = False


TOPOLOGY_OWNED = ("host", "port", "public_url", "log_level")


def split_tier_args(extra: list[str]) -> TierArgs:
    """Parse ``extra`` with the cloud's own flag parser (exits 2 on an unknown flag); settings that every
    tier has (``--insecure-dev``, ``--request-timeout``, ``--device``, TLS ...) go to every tier."""
    from shared.config.settings import CloudSettings, ServiceSettings
    from shared.http.service import settings_parser

    parser = settings_parser("splitllm topology up (tier flags)", CloudSettings)
    parsed = vars(parser.parse_args(extra))
    out = TierArgs()
    if parsed.pop("config") is not None:
        out.cloud += ["--config", str(parsed_config(extra))]
    for name, value in parsed.items():
        if value is None:
            continue
        if name in TOPOLOGY_OWNED:
            parser.error(f"--{name.replace('_', '-')} is set by the topology")
        if name in ("token", "admin_token"):  # development secrets (with --insecure-dev) travel in the environment
            out.env[f"SPLITLLM_{name.upper()}"] = str(value)
            continue
        flag = f"--{name.replace('_', '-')}"
        args = [flag] if CloudSettings.model_fields[name].annotation is bool else [flag, str(value)]
        (out.common if name in ServiceSettings.model_fields else out.cloud).extend(args)
        if name == "ssl_certfile":
            out.scheme = "https"
        if name == "insecure_dev":
            out.insecure_dev = True
    return out


def parsed_config(extra: list[str]) -> str:
    for i, arg in enumerate(extra):
        if arg == "--config" and i + 1 < len(extra):
            return str(Path(extra[i + 1]).resolve())
        if arg.startswith("--config="):
            return str(Path(arg.split("=", 1)[1]).resolve())
    raise ValueError("--config needs a file")


def tier_commands(plan: Plan, workdir: Path, python: str, tier_args: TierArgs,
                  log_level: str = "warning", emulate: bool = False) -> dict[str, list[str]]:
    """``ip netns exec <ns> python -m shared.lab.cli <tier> ...`` for every tier; the tiers listen inside
    their own namespaces (cloud and edges on all their links, users on their one address). With
    ``emulate`` (no netem in the kernel) edges and users get their link profile with ``--link-rate-shaped``:
    tbf paces the bytes, and their link emulators add the profile's delay, jitter and loss."""
    def link(profile: str) -> list[str]:
        return ["--link-profile", profile, "--link-rate-shaped"] if emulate and profile != "none" else []

    cmds: dict[str, list[str]] = {}
    common = ["--log-level", log_level, *tier_args.common]
    s = tier_args.scheme
    cmds["cloud"] = in_ns(plan.namespaces["cloud"], python, "-m", "shared.lab.cli", "cloud", "--host", "0.0.0.0",
                          "--port", str(PORTS["cloud"]), "--data-dir", str(workdir / "cloud"),
                          "--num-clients", str(plan.users), *common, *tier_args.cloud)
    for e in range(plan.edges):
        name = f"edge-{e}"
        cmds[name] = in_ns(plan.namespaces[name], python, "-m", "shared.lab.cli", "edge", "--host", "0.0.0.0",
                           "--port", str(PORTS["edge"]), "--cloud", f"{s}://{parent_addr(plan, name)}:{PORTS['cloud']}",
                           "--edge-id", name, "--public-url", f"{s}://{plan.addrs[name]}:{PORTS['edge']}",
                           *link(plan.edge_profile), *common)
    for i in range(plan.users):
        name = f"user-{i}"
        addr = plan.addrs[name]
        cmds[name] = in_ns(plan.namespaces[name], python, "-m", "shared.lab.cli", "user", "--host", addr,
                           "--port", str(PORTS["user"]), "--edge", f"{s}://{parent_addr(plan, name)}:{PORTS['edge']}",
                           "--client-index", str(i), "--public-url", f"{s}://{addr}:{PORTS['user']}",
                           *link(plan.profile), *common)
    return cmds


def tier_env(tier_args: TierArgs, workdir: Path, plan: Plan | None = None) -> dict[str, dict[str, str]]:
    """Each tier's environment: ours, and (unless --insecure-dev) a credential of its own from a fresh deployment
    key in ``<workdir>/credentials`` (the admin's bearer credential lands in ``<workdir>/credentials/admin.token``);
    with --insecure-dev, the shared development tokens given as flags."""
    from shared.lab.credentials import provision

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("SPLITLLM_TOKEN", "SPLITLLM_ADMIN_TOKEN", "SPLITLLM_CREDENTIAL", "SPLITLLM_TRUST_KEY"):
        env.pop(name, None)
    env.update(tier_args.env)
    names = ["cloud", *(f"edge-{e}" for e in range(plan.edges)), *(f"user-{u}" for u in range(plan.users))] if plan else []
    if tier_args.insecure_dev or plan is None:
        return {name: env for name in names}
    shutil.rmtree(workdir / "credentials", ignore_errors=True)
    creds = provision(workdir / "credentials", [n for n in names if n.startswith("edge")],
                      {n: int(n.split("-")[1]) for n in names if n.startswith("user")})
    return {name: {**env, **creds.env(name)} for name in names}


# ---------------------------------------------------------------------------------------------
# starting and waiting


def start_time(pid: int) -> str | None:
    """``pid``'s start time from /proc (None when it is gone): with the pid, it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def start_tiers(plan: Plan, state: State, cmds: dict[str, list[str]], envs: dict[str, dict[str, str]],
                scheme: str = "http") -> dict[str, subprocess.Popen]:
    popens: dict[str, subprocess.Popen] = {}
    for name, cmd in cmds.items():
        tier = name.split("-")[0]
        port = PORTS[tier]
        state.data["urls"][name] = f"{scheme}://{plan.addrs[name]}:{port}"
        log = state.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(cmd, cwd=ROOT, env=envs[name], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        popens[name] = popen
        state.data["procs"].append({"name": name, "ns": plan.namespaces[name], "pid": popen.pid,
                                    "start_time": start_time(popen.pid), "log": str(log), "cmd": cmd})
        state.save()
    return popens


def _get_json(url: str, timeout: float = 3.0) -> dict[str, Any]:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]  # never through a proxy
    if url.startswith("https:"):  # our own link, polled for readiness only: the certificate names no 10.77 address
        import ssl

        handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read())


_HEALTH_POLL = r"""
import json, ssl, sys, time, urllib.request
url, deadline = sys.argv[1] + "/healthz", time.monotonic() + float(sys.argv[2])
handlers = [urllib.request.ProxyHandler({})]
if url.startswith("https:"):
    handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
opener, last = urllib.request.build_opener(*handlers), "no answer"
while time.monotonic() < deadline:
    try:
        with opener.open(url, timeout=3) as r:
            print(r.read().decode(), flush=True)
            sys.exit(0)
    except Exception as exc:
        last = str(exc)
    time.sleep(1.0)
print(last, flush=True)
sys.exit(1)
"""


def wait_ready(plan: Plan, state: State, popens: dict[str, subprocess.Popen], timeout: float,
               python: str = sys.executable) -> None:
    """Until every tier answers its /healthz with 200 (a user: loaded and registered), each polled from
    inside its own namespace, and the cloud counts every user."""
    end = time.monotonic() + timeout
    pollers = {name: subprocess.Popen(in_ns(plan.namespaces[name], python, "-c", _HEALTH_POLL, url, str(timeout)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True)
               for name, url in state.data["urls"].items()}
    try:
        while True:
            for name, p in popens.items():
                if p.poll() is not None:
                    log = Path(state.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise TopologyError(f"{name} exited with {p.returncode}; the end of its log:\n{log}")
            failed = [n for n, p in pollers.items() if p.poll() not in (None, 0)]
            if failed or time.monotonic() > end:
                waiting = failed or [n for n, p in pollers.items() if p.poll() is None]
                raise TopologyError(f"not ready after {timeout:.0f}s: {', '.join(waiting)}; logs in {state.workdir}")
            if all(p.poll() == 0 for p in pollers.values()):
                break
            time.sleep(0.5)
        url = f"{state.data['urls']['cloud']}/healthz"
        while True:
            health = _get_json(url)
            if health.get("users", 0) >= plan.users:
                return
            if time.monotonic() > end:
                raise TopologyError(f"the cloud counts {health.get('users')} of {plan.users} users "
                                    f"after {timeout:.0f}s")
            time.sleep(0.5)
    finally:
        for p in pollers.values():
            if p.poll() is None:
                p.kill()
            p.wait()


# ---------------------------------------------------------------------------------------------
# killing


def alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` still runs and is the process that started at ``started`` (not a reused pid)."""
    current = start_time(pid)
    return current is not None and (started is None or current == started)


def ns_pids(ns: str) -> list[int]:
    """Every process inside namespace ``ns``."""
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_processes(pids: list[int], grace: float) -> None:
    """SIGTERM to every pid, SIGKILL to those still there after ``grace`` seconds, then reap our own."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while any(start_time(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    for pid in pids:
        if start_time(pid):
            _signal(pid, signal.SIGKILL)
    for pid in pids:  # reap our own children when down runs in the process that started them
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
