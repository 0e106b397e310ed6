"""Real shaped links on one Linux host: one network namespace per tier, veth pairs between them.

``splitllm topology up --profile 4g [--users 4 --edges 2 --edge-profile fiber --workdir runs/topology
[cloud flags: --model ... --data ...]]`` builds, as root::

    root ns --(sl-host, unshaped)-- sl-cloud --(edge profile)-- sl-edge<e> --(user profile)-- sl-user<i>

with user i behind edge i % E, one /30 per link (10.77.0.0/30 host<->cloud, 10.77.1.4e/30
edge e<->cloud, 10.77.(2 + i // 64).4(i % 64)/30 user i<->its edge). Each end's egress is shaped
with ``tc tbf``: the user's towards its edge at the profile's uplink rate, the edge's towards the user
at its downlink rate, and likewise edge<->cloud with the edge profile. Where the kernel has ``netem``
(probed once in a scratch namespace) the profile's delay, jitter and loss go in a netem qdisc above
the tbf; where it does not, only the rates are real and delay/loss come from the transport's link
emulator (``shared.links.LinkEmulator``) if the run configures one. The tiers then start inside their
namespaces (``ip netns exec <ns> python -m shared.cli <tier> ...``), and ``up`` waits until every
user has registered, writes ``<workdir>/state.json`` (namespaces, veths, pids, urls) and prints the
cloud's URL, which the host reaches over the unshaped ``sl-host`` link. Flags ``up`` does not know are
the tiers' settings: cloud-only ones go to the cloud, ones every tier has to every tier. Without
``--insecure-dev`` or tokens in the environment, fresh tokens are made (the admin token is written to
``<workdir>/admin-token``, mode 0600).

``splitllm topology down [--workdir ...]`` stops those processes and deletes the namespaces (their
veths go with them). It is idempotent and also cleans up after an ``up`` that failed half-way: the
state file is written before each thing is created.

``measure_rate`` times a plain TCP transfer between two namespaces (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.protocol.links import LinkProfile, get_profile

ROOT = Path(__file__).resolve().parents[2]  # the directory holding shared/
STATE_FILE = "state.json"
PORTS = {"cloud": 8000, "edge": 8100, "user": 8200}
MAX_EDGES = 64
MAX_USERS = 64 * 200


class TopologyError(RuntimeError):
    """A step of building or tearing down the topology failed; reported in one line."""


# ---------------------------------------------------------------------------------------------
# commands


def run(cmd: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise TopologyError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {why}")
    return proc


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def requirements_problem() -> str | None:
    """Why namespaces cannot be built here, or None when they can (root, Linux, ip and tc)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install -y iproute2)"
    return None


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netem_supported(probe_ns: str) -> bool:
    """Whether ``tc qdisc ... netem`` works: tried once on ``lo`` of a scratch namespace."""
    run(["ip", "netns", "add", probe_ns])
    try:
        return run(in_ns(probe_ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"),
                   check=False).returncode == 0
    finally:
        run(["ip", "netns", "del", probe_ns], check=False)


# ---------------------------------------------------------------------------------------------
# the plan: namespaces, links, addresses, rates


@dataclass
class End:
    ns: str | None  # None: the root namespace
    dev: str
    addr: str  # without the /30
    egress_mbps: float | None  # None: unshaped


@dataclass
class Link:
    name: str
    profile: str
    a: End
    b: End


@dataclass
class Plan:
    prefix: str
    users: int
    edges: int
    profile: str
    edge_profile: str
    subnet: str
    namespaces: dict[str, str] = field(default_factory=dict)  # tier name -> namespace
    addrs: dict[str, str] = field(default_factory=dict)  # tier name -> the address its parent calls back on
    links: list[Link] = field(default_factory=list)


def _rate(profile: LinkProfile | None, upward: bool) -> float | None:
    if profile is None:
        return None
    return profile.up_mbps if upward else profile.down_mbps


def make_plan(users: int, edges: int, profile: str, edge_profile: str, prefix: str = "sl-",
              subnet: str = "10.77") -> Plan:
    if not 1 <= edges <= MAX_EDGES:
        raise TopologyError(f"--edges must be in 1..{MAX_EDGES}")
    if not 1 <= users <= MAX_USERS:
        raise TopologyError(f"--users must be in 1..{MAX_USERS}")
    octets = subnet.split(".")
    if len(octets) != 2 or not all(o.isdigit() and 0 <= int(o) <= 255 for o in octets):
        raise TopologyError(f"--subnet takes the first two octets, e.g. 10.77 (got '{subnet}')")
    if len(f"{prefix}host") > 15:
        raise TopologyError(f"--prefix '{prefix}' is too long (interface names are at most 15 characters)")
    user_p, edge_p = get_profile(profile), get_profile(edge_profile)  # ValueError on unknown names
    plan = Plan(prefix, users, edges, profile, edge_profile, subnet)
    plan.namespaces["cloud"] = f"{prefix}cloud"
    for e in range(edges):
        plan.namespaces[f"edge-{e}"] = f"{prefix}edge{e}"
    for i in range(users):
        plan.namespaces[f"user-{i}"] = f"{prefix}user{i}"
    ns = plan.namespaces
    # the host reaches the cloud over an unshaped link
    plan.links.append(Link("host-cloud", "none", End(None, f"{prefix}host", f"{subnet}.0.1", None),
                           End(ns["cloud"], "host", f"{subnet}.0.2", None)))
    plan.addrs["host"], plan.addrs["cloud"] = f"{subnet}.0.1", f"{subnet}.0.2"
    for e in range(edges):
        base = 4 * e
        edge_end = End(ns[f"edge-{e}"], "cloud", f"{subnet}.1.{base + 2}", _rate(edge_p, upward=True))
        cloud_end = End(ns["cloud"], f"edge{e}", f"{subnet}.1.{base + 1}", _rate(edge_p, upward=False))
        plan.links.append(Link(f"edge-{e}-cloud", edge_profile, edge_end, cloud_end))
        plan.addrs[f"edge-{e}"] = edge_end.addr
    for i in range(users):
        e = i % edges
        third, base = 2 + i // 64, 4 * (i % 64)
        user_end = End(ns[f"user-{i}"], "edge", f"{subnet}.{third}.{base + 2}", _rate(user_p, upward=True))
        edge_end = End(ns[f"edge-{e}"], f"user{i}", f"{subnet}.{third}.{base + 1}", _rate(user_p, upward=False))
        plan.links.append(Link(f"user-{i}-edge-{e}", profile, user_end, edge_end))
        plan.addrs[f"user-{i}"] = user_end.addr
    return plan


def link_of(plan: Plan, name: str) -> Link:
    return next(link for link in plan.links if link.name == name)


def parent_addr(plan: Plan, tier: str) -> str:
    """The address on ``tier``'s uplink at which it reaches its parent (edge for a user, cloud for an edge)."""
    if tier.startswith("user-"):
        i = int(tier.split("-")[1])
        return link_of(plan, f"{tier}-edge-{i % plan.edges}").b.addr
    if tier.startswith("edge-"):
        return link_of(plan, f"{tier}-cloud").b.addr
    raise ValueError(tier)


# ---------------------------------------------------------------------------------------------
# shaping


def shaping_commands(ns: str | None, dev: str, rate_mbps: float, profile: LinkProfile | None,
                     netem: bool) -> list[list[str]]:
    """tc commands that shape ``dev``'s egress: a tbf at ``rate_mbps``, below a netem (delay, jitter,
    loss of ``profile``) when the kernel has netem. One way of a link carries the profile's one-way delay."""
    rate_bytes = rate_mbps * 1e6 / 8
    burst = max(16 * 1024, int(rate_bytes * 0.004))  # >= 4 ms worth, and a few full-size frames
    tbf = ["tbf", "rate", f"{rate_mbps:g}mbit", "burst", str(burst), "latency", "50ms"]
    prefix = (["ip", "netns", "exec", ns] if ns else []) + ["tc", "qdisc", "replace", "dev", dev]
    if not (netem and profile is not None and (profile.delay_ms or profile.loss_pct)):
        return [prefix + ["root", "handle", "1:", *tbf]]
    nm = ["netem", "limit", "10000"]
    if profile.delay_ms or profile.jitter_ms:
        nm += ["delay", f"{profile.delay_ms:g}ms"] + ([f"{profile.jitter_ms:g}ms"] if profile.jitter_ms else [])
    if profile.loss_pct:
        nm += ["loss", f"{profile.loss_pct:g}%"]
    # netem at the root delays and drops; the tbf below it paces the bytes (the netem wiki's recipe)
    return [prefix + ["root", "handle", "1:", *nm], prefix + ["parent", "1:1", "handle", "10:", *tbf]]


# ---------------------------------------------------------------------------------------------
# state


class State:
    """What ``up`` made, saved to disk before each step so that ``down`` can undo a half-built topology."""

    def __init__(self, workdir: Path, data: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.data: dict[str, Any] = data or {"namespaces": [], "veths": [], "host_veth": None, "procs": [],
                                             "urls": {}, "netem": None, "shaping": []}

    @property
    def path(self) -> Path:
        return self.workdir / STATE_FILE

    @classmethod
    def load(cls, workdir: Path) -> State | None:
        path = workdir / STATE_FILE
        if not path.exists():
            return None
        try:
            return cls(workdir, json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise TopologyError(f"{path}: unreadable state file ({exc}); delete the sl-* namespaces by hand "
                                f"(`ip netns list`, `ip netns del NAME`)") from None

    def save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


# ---------------------------------------------------------------------------------------------
# up


def build_network(plan: Plan, state: State, netem: bool) -> None:
    """Namespaces, veths, addresses, links up, shaping. Records everything in ``state`` first."""
    existing = set(list_namespaces())
    clash = sorted(set(plan.namespaces.values()) & existing)
    if clash:
        raise TopologyError(f"namespaces already exist: {', '.join(clash)} (run `splitllm topology down` "
                            f"with the workdir that made them, or `ip netns del NAME`)")
    profiles = {name: get_profile(name) for name in {plan.profile, plan.edge_profile}}
    for ns in plan.namespaces.values():
        state.data["namespaces"].append(ns)
        state.save()
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    for link in plan.links:
        a, b = link.a, link.b
        state.data["veths"].append({"link": link.name, "profile": link.profile, "a": asdict(a), "b": asdict(b)})
        if a.ns is None:
            state.data["host_veth"] = a.dev
        state.save()
        cmd = ["ip", "link", "add", a.dev] + (["netns", a.ns] if a.ns else [])
        run(cmd + ["type", "veth", "peer", "name", b.dev, "netns", b.ns])
        for end in (a, b):
            ip = ["ip"] + (["-n", end.ns] if end.ns else [])
            run(ip + ["addr", "add", f"{end.addr}/30", "dev", end.dev])
            run(ip + ["link", "set", end.dev, "up"])
        for end in (a, b):
            if end.egress_mbps is None:
                continue
            for cmd in shaping_commands(end.ns, end.dev, end.egress_mbps, profiles.get(link.profile), netem):
                state.data["shaping"].append(" ".join(cmd))
                run(cmd)
        state.save()


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
    from shared.http.service import settings_parser
    from shared.config.settings import CloudSettings, ServiceSettings

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
        if name in ("token", "admin_token"):
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
                  log_level: str = "warning") -> dict[str, list[str]]:
    """``ip netns exec <ns> python -m shared.cli <tier> ...`` for every tier; the tiers listen inside
    their own namespaces (cloud and edges on all their links, users on their one address)."""
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
                           "--edge-id", name, "--public-url", f"{s}://{plan.addrs[name]}:{PORTS['edge']}", *common)
    for i in range(plan.users):
        name = f"user-{i}"
        addr = plan.addrs[name]
        cmds[name] = in_ns(plan.namespaces[name], python, "-m", "shared.lab.cli", "user", "--host", addr,
                           "--port", str(PORTS["user"]), "--edge", f"{s}://{parent_addr(plan, name)}:{PORTS['edge']}",
                           "--client-index", str(i), "--public-url", f"{s}://{addr}:{PORTS['user']}", *common)
    return cmds


def tier_env(tier_args: TierArgs, workdir: Path) -> dict[str, str]:
    """The tiers' environment: ours, the tokens given as flags, and fresh tokens where none is set
    (unless --insecure-dev); a generated admin token is written to ``<workdir>/admin-token`` (0600)."""
    import secrets

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(tier_args.env)
    if not tier_args.insecure_dev:
        env.setdefault("SPLITLLM_TOKEN", secrets.token_urlsafe(24))
        if "SPLITLLM_ADMIN_TOKEN" not in env:
            env["SPLITLLM_ADMIN_TOKEN"] = secrets.token_urlsafe(24)
            path = workdir / "admin-token"
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(env["SPLITLLM_ADMIN_TOKEN"] + "\n")
    return env


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def start_tiers(plan: Plan, state: State, cmds: dict[str, list[str]], env: dict[str, str],
                scheme: str = "http") -> dict[str, subprocess.Popen]:
    popens: dict[str, subprocess.Popen] = {}
    for name, cmd in cmds.items():
        tier = name.split("-")[0]
        port = PORTS[tier]
        state.data["urls"][name] = f"{scheme}://{plan.addrs[name]}:{port}"
        log = state.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        popens[name] = popen
        state.data["procs"].append({"name": name, "ns": plan.namespaces[name], "pid": popen.pid,
                                    "start_time": _start_time(popen.pid), "log": str(log), "cmd": cmd})
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


def up(plan: Plan, workdir: Path, tiers: bool = True, tier_args: TierArgs | None = None,
       python: str = sys.executable, timeout: float = 900.0, log_level: str = "warning") -> State:
    """Build the network (and start the tiers); on any failure undo what was made and re-raise."""
    problem = requirements_problem()
    if problem:
        raise TopologyError(problem)
    workdir = workdir.resolve()
    if State.load(workdir) is not None:  # a previous run from this workdir: clear it first
        print(f"clearing the previous topology recorded in {workdir / STATE_FILE}", flush=True)
        down(workdir, quiet=True)
    state = State(workdir)
    state.data.update({"prefix": plan.prefix, "profile": plan.profile, "edge_profile": plan.edge_profile,
                       "users": plan.users, "edges": plan.edges, "subnet": plan.subnet, "addrs": plan.addrs})
    probe = f"{plan.prefix}probe"
    state.data["namespaces"].append(probe)  # cleaned by down if we die inside the probe
    state.save()
    try:
        netem = netem_supported(probe)
        state.data["namespaces"].remove(probe)
        state.data["netem"] = netem
        state.save()
        build_network(plan, state, netem)
        if tiers:
            tier_args = tier_args or TierArgs()
            cmds = tier_commands(plan, workdir, python, tier_args, log_level)
            popens = start_tiers(plan, state, cmds, tier_env(tier_args, workdir), tier_args.scheme)
            wait_ready(plan, state, popens, timeout, python)
    except BaseException:
        down(workdir, quiet=True)
        raise
    return state


# ---------------------------------------------------------------------------------------------
# down


def _alive(pid: int, start_time: str | None) -> bool:
    current = _start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def _ns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def down(workdir: Path, quiet: bool = False, sweep_prefix: str | None = None, grace: float = 10.0) -> list[str]:
    """Stop the processes and delete the namespaces recorded in ``<workdir>/state.json`` (and, with
    ``sweep_prefix``, every namespace whose name starts with it). Safe to repeat. Returns what it removed."""
    workdir = workdir.resolve()
    state = State.load(workdir)
    namespaces: list[str] = list(state.data.get("namespaces", [])) if state else []
    if sweep_prefix:
        namespaces += [ns for ns in list_namespaces() if ns.startswith(sweep_prefix) and ns not in namespaces]
    existing = set(list_namespaces()) if namespaces else set()
    namespaces = [ns for ns in namespaces if ns in existing]
    # the processes we started (pid + start time guard against a reused pid), and anything else inside
    pids = [p["pid"] for p in (state.data.get("procs", []) if state else []) if _alive(p["pid"], p.get("start_time"))]
    for ns in namespaces:
        pids += [p for p in _ns_pids(ns) if p not in pids and p != os.getpid()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while any(_start_time(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    for pid in pids:
        if _start_time(pid):
            _signal(pid, signal.SIGKILL)
    for pid in pids:  # reap our own children when down runs in the process that started them
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    removed = []
    for ns in namespaces:
        if run(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(ns)
    host_veth = state.data.get("host_veth") if state else None
    if host_veth and run(["ip", "link", "show", host_veth], check=False).returncode == 0:
        run(["ip", "link", "del", host_veth], check=False)  # normally gone with its peer's namespace
    left = sorted(set(namespaces) & set(list_namespaces()))
    if left:
        raise TopologyError(f"could not delete namespaces: {', '.join(left)}")
    if state is not None:
        state.path.unlink(missing_ok=True)
        (workdir / "admin-token").unlink(missing_ok=True)
    if not quiet:
        print(f"stopped {len(pids)} processes, deleted {len(removed)} namespaces"
              + (f": {' '.join(removed)}" if removed else ""), flush=True)
    return removed


# ---------------------------------------------------------------------------------------------
# measuring a link

_RECEIVER = r"""
import socket, sys, time
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 0)); srv.listen(1); srv.settimeout(float(sys.argv[2]))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.settimeout(float(sys.argv[2]))
n = first = 0; t0 = t1 = None
while True:
    b = conn.recv(1 << 16)
    if not b:
        break
    t1 = time.perf_counter()
    if t0 is None:
        t0, first = t1, len(b)
    n += len(b)
conn.sendall(f"{n} {first} {(t1 - t0) if t0 is not None else 0.0}\n".encode())
conn.close()
"""

_SENDER = r"""
import socket, sys
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((addr, port), timeout=timeout)
chunk = b"\0" * (1 << 16); left = nbytes
while left > 0:
    s.sendall(chunk[:min(left, len(chunk))]); left -= min(left, len(chunk))
s.shutdown(socket.SHUT_WR)
print(s.makefile().readline().strip(), flush=True)
"""


def measure_rate(src_ns: str, dst_ns: str, dst_addr: str, nbytes: int, timeout: float = 60.0,
                 python: str = sys.executable) -> float:
    """Mbit/s of payload that a TCP connection moves from ``src_ns`` to ``dst_addr`` (in ``dst_ns``),
    timed at the receiver from the first to the last byte (the first read's bytes not counted)."""
    recv = subprocess.Popen(in_ns(dst_ns, python, "-c", _RECEIVER, dst_addr, str(timeout)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = recv.stdout.readline().strip()
        if not line.isdigit():
            recv.wait(timeout=5)
            raise TopologyError(f"receiver in {dst_ns} did not start: {recv.stderr.read().strip()}")
        sent = run(in_ns(src_ns, python, "-c", _SENDER, dst_addr, line, str(nbytes), str(timeout)),
                   timeout=timeout + 5)
        n, first, seconds = sent.stdout.split()
        recv.wait(timeout=10)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    n, first, seconds = int(n), int(first), float(seconds)
    if n != nbytes:
        raise TopologyError(f"sent {nbytes} bytes, the receiver got {n}")
    if seconds <= 0:
        raise TopologyError("transfer too short to time; send more bytes")
    return (n - first) * 8 / seconds / 1e6


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitllm topology",
        description="One network namespace per tier, joined by veth pairs shaped with tc (root, Linux).")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("up", help="build the namespaces and links, start the tiers in them", allow_abbrev=False,
                       description="Other flags are the tiers' own: cloud settings (--model, --data, --split, ...) "
                       "go to the cloud, settings every tier has (--insecure-dev, --request-timeout, --device, "
                       "TLS) to every tier. Tokens come from --token/--admin-token, "
                       "SPLITLLM_TOKEN/SPLITLLM_ADMIN_TOKEN, or are "
                       "generated (the admin token then lands in <workdir>/admin-token).")
    p.add_argument("--profile", default="4g", help="link profile of each user<->edge hop (default 4g; none: unshaped)")
    p.add_argument("--edge-profile", default="fiber", help="link profile of each edge<->cloud hop (default fiber)")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--workdir", default="runs/topology", help="state file, logs and the cloud's data dir")
    p.add_argument("--prefix", default="sl-", help="namespace name prefix (default sl-)")
    p.add_argument("--subnet", default="10.77", help="first two octets of the links' addresses (default 10.77)")
    p.add_argument("--no-tiers", action="store_true", help="build the network only")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every user to register")
    p.add_argument("--log-level", default="warning", help="the tiers' log level (logs in the workdir)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the tiers")
    p = sub.add_parser("down", help="stop the tiers and delete what `up` made (idempotent)", allow_abbrev=False)
    p.add_argument("--workdir", default="runs/topology")
    p.add_argument("--sweep", metavar="PREFIX", default=None,
                   help="also delete every namespace whose name starts with PREFIX (e.g. sl-)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["topology"]:
        argv = argv[1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.action == "down" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.action == "down":
            problem = requirements_problem()
            if problem:
                raise TopologyError(problem)
            down(Path(args.workdir), sweep_prefix=args.sweep)
            return 0
        tier_args = split_tier_args(extra)
        plan = make_plan(args.users, args.edges, args.profile, args.edge_profile, args.prefix, args.subnet)
        workdir = Path(args.workdir)
        state = up(plan, workdir, tiers=not args.no_tiers, tier_args=tier_args, python=args.python,
                   timeout=args.timeout, log_level=args.log_level)
    except (TopologyError, ValueError) as exc:
        print(f"splitllm topology {args.action}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt:
        return 130
    d = state.data
    for link in d["veths"]:
        a, b = link["a"], link["b"]
        print(f"{link['link']:<16} {link['profile']:<6} "
              f"{a['ns'] or 'root'}:{a['dev']} {a['addr']} ({_fmt_rate(a['egress_mbps'])} out) <-> "
              f"{b['ns']}:{b['dev']} {b['addr']} ({_fmt_rate(b['egress_mbps'])} out)")
    if d["netem"]:
        print("netem: delay, jitter and loss of each profile applied by the kernel")
    else:
        print("netem: not in this kernel; tbf shapes the rates only, and delay/jitter/loss come from the "
              "transport's link emulator (shared/links.py) where a run configures one")
    print(f"state: {state.path}")
    if args.no_tiers:
        print("tiers not started (--no-tiers)")
    else:
        print(f"logs: {workdir.resolve()}/*.log; stop with: splitllm topology down --workdir {args.workdir}")
        token_file = workdir.resolve() / "admin-token"
        given = "SPLITLLM_ADMIN_TOKEN" in os.environ or "SPLITLLM_ADMIN_TOKEN" in tier_args.env
        if token_file.exists() and not given:
            print(f"admin token (round API): {token_file}")
        print(f"cloud: {d['urls']['cloud']}")
    return 0


def _fmt_rate(mbps: float | None) -> str:
    return "unshaped" if mbps is None else f"{mbps:g} Mbit/s"


if __name__ == "__main__":
    sys.exit(main())
