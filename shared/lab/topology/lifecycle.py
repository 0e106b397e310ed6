"""``up`` and ``down``: build the network and start the tiers, or stop them and delete what was made."""

from __future__ import annotations

import shutil

import os
import sys
from pathlib import Path

from shared.lab.topology.network import (STATE_FILE, State, build_network, list_namespaces, netem_supported,
                                         requirements_problem, run)
from shared.lab.topology.plan import Plan, TopologyError
from shared.lab.topology.tiers import (TierArgs, alive, kill_processes, ns_pids, start_tiers, tier_commands, tier_env,
                                       wait_ready)


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
            cmds = tier_commands(plan, workdir, python, tier_args, log_level, emulate=not netem)
            popens = start_tiers(plan, state, cmds, tier_env(tier_args, workdir, plan), tier_args.scheme)
            wait_ready(plan, state, popens, timeout, python)
    except BaseException:
        down(workdir, quiet=True)
        raise
    return state


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
    pids = [p["pid"] for p in (state.data.get("procs", []) if state else []) if alive(p["pid"], p.get("start_time"))]
    for ns in namespaces:
        pids += [p for p in ns_pids(ns) if p not in pids and p != os.getpid()]
    kill_processes(pids, grace)
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
        shutil.rmtree(workdir / "credentials", ignore_errors=True)
    if not quiet:
        print(f"stopped {len(pids)} processes, deleted {len(removed)} namespaces"
              + (f": {' '.join(removed)}" if removed else ""), flush=True)
    return removed
