"""The ``splitllm topology up|down`` command line: its parser, ``main`` and the summary ``up`` prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.lab.topology.lifecycle import down, up
from shared.lab.topology.network import requirements_problem
from shared.lab.topology.plan import TopologyError, make_plan
from shared.lab.topology.tiers import split_tier_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitllm topology",
        description="One network namespace per tier, joined by veth pairs shaped with tc (root, Linux).")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("up", help="build the namespaces and links, start the tiers in them", allow_abbrev=False,
                       description="Other flags are the tiers' own: cloud settings (--model, --data, --split, ...) "
                       "go to the cloud, settings every tier has (--insecure-dev, --request-timeout, --device, "
                       "TLS) to every tier. Each tier gets a credential of its own from a fresh deployment key "
                       "(<workdir>/credentials; the admin's bearer credential is <workdir>/credentials/admin.token); "
                       "with --insecure-dev, --token/--admin-token are the shared development secrets.")
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
        print("netem: not in this kernel; tbf shapes the rates, and the edges' and users' link emulators "
              "(--link-rate-shaped) add each profile's delay, jitter and loss")
    print(f"state: {state.path}")
    if args.no_tiers:
        print("tiers not started (--no-tiers)")
    else:
        print(f"logs: {workdir.resolve()}/*.log; stop with: splitllm topology down --workdir {args.workdir}")
        token_file = workdir.resolve() / "credentials" / "admin.token"
        if token_file.exists():
            print(f"admin credential (round API, Authorization: Bearer): {token_file}")
        print(f"cloud: {d['urls']['cloud']}")
    return 0


def _fmt_rate(mbps: float | None) -> str:
    return "unshaped" if mbps is None else f"{mbps:g} Mbit/s"
