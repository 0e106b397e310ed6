"""Benchmark that writes JSON: samples per second against the number of concurrent users, through 2 edges.

Real processes on loopback: one cloud, ``edges`` edges, N users (user i behind edge i % edges), each
user's link to its edge running the profile (``none``: plain loopback). For each N one cluster runs
rounds alternately unpipelined and in ``micro_batches`` micro-batches. Samples per second is the sum
over users of batch / median step seconds (each round's first step left out); the round's own
samples / wall seconds, which includes starting and ending it, is recorded beside it.

The evidence of what bounds it, per round: CPU seconds each process used over the round's wall seconds
(``cpu_busy``: how many cores the whole cluster kept busy, against ``cpus``), the machine's load average,
and each user's link seconds per step by the profile's rate (``link_s_per_step``). When ``cpu_busy``
reaches the cores while link seconds are a small part of a step, it is the CPU; when a step is mostly
link seconds, the link.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from shared.config.round import RoundConfig
from shared.lab.bench.pipeline import bench_parser, data_args, user_steps
from shared.lab.bench.timing import timed_round
from shared.lab.cluster import Cluster
from shared.protocol.links import get_profile


def link_seconds(profile: str, up: float, down: float) -> float:
    """Seconds a step's bytes take on the profile's link by its rates (no delay, no loss)."""
    if profile == "none":
        return 0.0
    p = get_profile(profile)
    return up * 8 / (p.up_mbps * 1e6) + down * 8 / (p.down_mbps * 1e6)


def one_round(cluster: Cluster, users: int, body: dict[str, Any], profile: str) -> dict[str, Any]:
    """One round's throughput and what bounded it."""
    timed = timed_round(cluster, body)
    view, wall, cpu = timed["view"], timed["wall"], timed["cpu_seconds"]
    steps = user_steps(view)
    batch, n = body["batch_size"], body["local_steps"]
    medians = {u: statistics.median(t[1:] if len(t) > 1 else t) for u, t in steps.items()}
    hop = view["metrics"]["bytes"]["user_edge"]
    up, down = hop["up"] / (n * users), hop["down"] / (n * users)
    return {
        "samples_per_s": sum(batch / s for s in medians.values()),
        "round_samples_per_s": users * batch * n / view["metrics"]["seconds"],
        "round_seconds": view["metrics"]["seconds"], "median_step_s": medians,
        "link_s_per_step": link_seconds(profile, up, down), "bytes_per_user_step": {"up": up, "down": down},
        "cpu_seconds": cpu, "cpu_busy": sum(cpu.values()) / wall, "machine": timed["machine"],
    }


def bench_scaling(model: str = "minilm-l6", split: str = "1,3", users: tuple[int, ...] = (1, 2, 4, 8, 16),
                  edges: int = 2, profiles: tuple[str, ...] = ("none", "wifi"), micro_batches: int = 4,
                  batch_size: int = 16, seq_len: int = 128, steps: int = 5, threads: int = 1) -> dict[str, Any]:
    """Samples per second for each user count and profile, with 1 and ``micro_batches`` micro-batches."""
    RoundConfig(batch_size=batch_size, micro_batches=micro_batches)  # refuse bad settings before starting anything
    env = {**os.environ, "SPLITLLM_THREADS": str(threads)}
    settings = sorted({1, micro_batches})
    out: dict[str, Any] = {"model": model, "split": split, "batch": [batch_size, seq_len], "edges": edges,
                           "steps": steps, "threads": threads, "cpus": os.cpu_count(), "micro_batches": settings,
                           "runs": {}}
    for profile in profiles:
        rows = out["runs"].setdefault(profile, {})
        for n in users:
            with tempfile.TemporaryDirectory() as tmp:
                cluster = Cluster(Path(tmp), data_args(model, split, batch_size, seq_len, steps), users=n,
                                  edges=edges, user_args=["--link-profile", profile] if profile != "none" else [],
                                  env=env)
                try:
                    cluster.start()
                    rows[str(n)] = {str(m): one_round(cluster, n, {"local_steps": steps, "batch_size": batch_size,
                                                                   "micro_batches": m, "evaluate": False}, profile)
                                    for m in settings}
                finally:
                    cluster.stop()
        for n, row in rows.items():
            for m, r in row.items():
                r["speedup_vs_1_user"] = r["samples_per_s"] / rows[str(users[0])][m]["samples_per_s"] * users[0]
    return out


def summary(report: dict[str, Any]) -> list[str]:
    lines = [(f"{report['model']} batch {report['batch']}, {report['edges']} edges, {report['steps']} steps per round, "
              f"{report['threads']} torch thread(s) per process, {report['cpus']} cores:")]
    for profile, rows in report["runs"].items():
        for n, row in rows.items():
            for m, r in row.items():
                lines.append(f"  {profile:>5} users {n:>2} micro-batches {m}: {r['samples_per_s']:6.1f} samples/s "
                             f"(x{r['speedup_vs_1_user']:.2f} of 1 user; round {r['round_samples_per_s']:.1f}), "
                             f"cores busy {r['cpu_busy']:.2f}, link {r['link_s_per_step']:.2f} s of a "
                             f"{statistics.median(r['median_step_s'].values()):.2f} s step, "
                             f"load {r['machine']['load_before'][0]} -> {r['machine']['load_after'][0]}")
    return lines


def link_name(profile: str) -> str:
    return "loopback" if profile == "none" else profile


def plot(report: dict[str, Any], path: Path) -> None:
    """Samples per second against users, one line per link and micro-batch count (the README's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for profile, by_users in report["runs"].items():
        for m in report["micro_batches"]:
            users = sorted(int(n) for n in by_users)
            ax.plot(users, [by_users[str(n)][str(m)]["samples_per_s"] for n in users], marker="o",
                    label=f"{link_name(profile)}, {m} micro-batch{'es' if m > 1 else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(users, [str(n) for n in users])
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("samples per second")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from shared.lab.bench.timing import write_json

    p = bench_parser("splitllm bench scaling", __doc__)
    p.add_argument("--users", default="1,2,4,8,16", help="comma-separated user counts")
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--profile", action="append", default=None,
                   help="the users' links (none = loopback, wifi, 4g, ...; default: none and wifi)")
    p.add_argument("--steps", type=int, default=5, help="steps per round (the first of each is left out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every process (0: one per core)")
    p.add_argument("--quick", action="store_true", help="1 and 4 users under wifi, 3 steps")
    args = p.parse_args(argv)
    users = (1, 4) if args.quick else tuple(int(x) for x in args.users.split(","))
    profiles = tuple(args.profile or (("wifi",) if args.quick else ("none", "wifi")))
    report = bench_scaling(args.model, args.split, users, args.edges, profiles, args.micro_batches,
                           args.batch_size, args.seq_len, 3 if args.quick else args.steps, args.threads)
    report["command"] = "splitllm bench scaling " + " ".join(argv if argv is not None else [])
    print("\n".join(summary(report)))
    write_json(report, args.json)
    return 0
