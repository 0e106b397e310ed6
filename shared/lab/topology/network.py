"""The network itself: ip/tc commands, namespaces, tc shaping, the netem probe and the state file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared.lab.topology.plan import Plan, TopologyError
from shared.protocol.links import LinkProfile, get_profile

STATE_FILE = "state.json"


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
# building


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
