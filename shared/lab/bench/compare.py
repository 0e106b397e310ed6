"""``splitllm bench compare``: centralised LoRA, federated LoRA and the three-tier split, side by side.

Same model, data, partition and seed for every method:

* ``centralised``: one trainer holding the pooled data (every client's train set joined, and every
  client's held-out set joined: the same held-out examples as the others), the whole model, ``users x
  local_steps`` steps a round, so it sees as many samples a round as the federation: the quality ceiling.
* ``federated-fp32``, ``federated-int8``: federated LoRA with FedAvg, each device holding the whole model
  and its head (split a = b = L, U-shaped: a step sends nothing; only the adapters cross the link).
* ``split-fp32``, ``split-int8``: the three-tier split at ``split``.

``-int8`` is int8 on everything a device's link carries (activations, gradients, uploads, downloads);
``-fp32`` sends it lossless.

Per method:

* quality: held-out loss and accuracy after ``rounds`` rounds, in-process (``shared.lab.sim``);
* device peak memory: the peak resident memory of a fresh process that holds the device's part (the
  whole model for centralised and federated, the user tier for the split) and runs one training step
  at the bench's batch (``shared.lab.memory``);
* device compute seconds per step: the device's compute phases, in-process (wall seconds: the load
  inflates them), and the CPU seconds of each device process per step in the timed rounds;
* bytes per device per round: the device's link, both ways, in a training round (encoded messages);
* round wall time under each link profile: real processes on loopback (``shared.lab.cluster``), each
  device's link to its edge running the profile, one training round; the CPU seconds of every process
  and the load average beside it. One cluster per method holds ``users`` devices per profile (the data
  partitioned into that many clients: the timing's own), and each profile's devices train one round.
  The centralised trainer has no device link: it is not timed there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.config.deployment import DataSpec
from shared.config.round import RoundConfig
from shared.data.datasets import ClientData, FederatedDataset
from shared.lab.bench.scaling import one_round
from shared.lab.bench.timing import Machine, load, markdown_table
from shared.lab.cluster import Cluster
from shared.lab.memory import probe_process
from shared.lab.sim import SimConfig, Simulation

METHODS = ("centralised", "federated-fp32", "federated-int8", "split-fp32", "split-int8")
INT8 = "activations=int8,gradients=int8,uploads=int8,downloads=int8"


def pooled(dataset: FederatedDataset) -> FederatedDataset:
    """The federation's data as one client: every client's train and held-out examples joined."""
    return FederatedDataset(dataset.name, dataset.task, dataset.label_names, [ClientData(
        "pooled", [e for c in dataset.clients for e in c.train], [e for c in dataset.clients for e in c.eval])])


class Setting:
    """What every method shares, and what one method changes: its split, U-shape, codecs and users."""

    def __init__(self, args: argparse.Namespace, num_layers: int) -> None:
        self.args, self.num_layers = args, num_layers
        self.split = tuple(int(x) for x in args.split.split(","))

    def of(self, method: str) -> dict[str, Any]:
        whole, central = not method.startswith("split"), method == "centralised"
        return {"split": (self.num_layers, self.num_layers) if whole else self.split, "u_shaped": whole,
                "codecs": INT8 if method.endswith("int8") else "fp32", "users": 1 if central else self.args.users,
                "edges": 1 if central else self.args.edges,
                "local_steps": self.args.local_steps * (self.args.users if central else 1)}

    def sim(self, method: str, dataset: FederatedDataset) -> Simulation:
        a, m = self.args, self.of(method)
        return Simulation(SimConfig(
            model=a.model, data=a.data, users=m["users"], edges=m["edges"], rounds=a.rounds, split=m["split"],
            u_shaped=m["u_shaped"], user_edge_codecs=m["codecs"], edge_cloud_codecs=m["codecs"], max_len=a.seq_len,
            max_examples_per_client=a.max_examples, eval_examples_per_client=a.eval_examples, seed=a.seed,
            baseline_eval=False,
            round=RoundConfig(local_steps=m["local_steps"], batch_size=a.batch_size, lr=a.lr, evaluate=False)),
            dataset=dataset)

    def cloud_args(self, method: str) -> list[str]:
        a, m = self.args, self.of(method)
        return ["--model", a.model, "--split", ",".join(map(str, m["split"])), "--data", a.data, "--seed", str(a.seed),
                "--max-len", str(a.seq_len), "--max-examples-per-client", str(a.max_examples),
                "--eval-examples-per-client", str(a.eval_examples), "--user-edge-codecs", m["codecs"],
                "--edge-cloud-codecs", m["codecs"], *(["--u-shaped"] if m["u_shaped"] else [])]


def quality(setting: Setting, method: str, federated: FederatedDataset) -> dict[str, Any]:
    """``rounds`` training rounds in-process, then the held-out figures; bytes and compute per device."""
    m = setting.of(method)
    sim = setting.sim(method, pooled(federated) if method == "centralised" else federated)
    rounds = [sim.run_round() for _ in range(setting.args.rounds)]
    held_out = sim.evaluate_only()
    steps = m["local_steps"] * m["users"]
    per_round = [(r["bytes"]["user"]["up"] + r["bytes"]["user"]["down"]) / m["users"] for r in rounds]
    central = method == "centralised"  # no device: its trainer holds the data (its simulated link is not counted)
    return {
        "eval_loss": held_out["eval_loss"], "eval_accuracy": held_out.get("eval_accuracy"),
        "train_loss": [r["train_loss"] for r in rounds],
        "bytes_per_device_per_round": None if central else statistics.fmean(per_round),
        "device_compute_s_per_step": statistics.fmean(r["compute_seconds"]["user"] / steps for r in rounds),
        "local_steps": m["local_steps"], "users": m["users"], "split": list(m["split"]), "codecs": m["codecs"],
    }


def timed(setting: Setting, method: str) -> dict[str, Any]:
    """One training round per link profile with real processes: one cluster with ``users`` devices per profile (each
    device's link to its edge running it), each round trained by one profile's devices."""
    a, m = setting.args, setting.of(method)
    env = {**os.environ, "SPLITLLM_THREADS": str(a.threads)}
    n = m["users"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), setting.cloud_args(method), users=n * len(a.profiles), edges=m["edges"],
                          user_extra={i: ["--link-profile", a.profiles[i // n]] for i in range(n * len(a.profiles))},
                          env=env)
        try:
            cluster.start()
            for k, profile in enumerate(a.profiles):
                users = [f"user-{i}" for i in range(k * n, (k + 1) * n)]
                r = one_round(cluster, n, {"local_steps": m["local_steps"], "batch_size": a.batch_size,
                                           "evaluate": False, "participants": users, **({"lr": a.lr} if a.lr else {})},
                              profile)
                out[profile] = {
                    "round_seconds": r["round_seconds"], "cpu_seconds": r["cpu_seconds"], "machine": r["machine"],
                    "device_cpu_s_per_step": statistics.fmean(r["cpu_seconds"][u] for u in users) / m["local_steps"],
                    "cores_busy": r["cpu_busy"]}
        finally:
            cluster.stop()
    return out


def bench_compare(args: argparse.Namespace) -> dict[str, Any]:
    from shared.model.sources import resolve_model

    source = resolve_model(args.model)
    setting = Setting(args, source.num_layers)
    if args.threads > 0:  # the in-process part too: torch's intra-op threads on a busy machine wait for cores
        import torch

        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("func", "json", "plot")}
    report.update(num_layers=source.num_layers, cpus=os.cpu_count(), load_before=load(), methods={})
    federated = DataSpec(name=args.data, num_clients=args.users, seed=args.seed, max_len=args.seq_len,
                         max_examples_per_client=args.max_examples, eval_examples_per_client=args.eval_examples).load()
    memory: dict[tuple[int, int], dict[str, Any]] = {}
    for method in args.methods:
        t0 = time.perf_counter()
        with Machine() as machine:
            row = quality(setting, method, federated)
        row["quality_machine"] = machine.record
        split = tuple(row["split"])
        if split not in memory:  # the whole model's device: a plain fine-tune of the model, as on one device
            tier = "whole" if split == (source.num_layers, source.num_layers) else "user"
            memory[split] = probe_process(args.model, split, tier, args.batch_size, args.seq_len)
        row["device_peak_rss_bytes"] = memory[split]["peak_rss_bytes"]
        row["rounds_timed"] = {} if method == "centralised" or not args.profiles else timed(setting, method)
        report["methods"][method] = row
        print(f"  {method}: " + "; ".join(summary_cells(row, args.profiles)) + f" ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    report["load_after"] = load()
    return report


def summary_cells(row: dict[str, Any], profiles: list[str]) -> list[str]:
    acc = row["eval_accuracy"]
    cells = [f"held-out loss {row['eval_loss']:.4f}" + (f", accuracy {acc:.3f}" if acc is not None else ""),
             f"device peak {row['device_peak_rss_bytes'] / 1e6:.0f} MB",
             f"device compute {row['device_compute_s_per_step']:.3f} s/step",
             f"{_mb(row['bytes_per_device_per_round'])} MB/device/round"]
    for p in profiles:
        t = row["rounds_timed"].get(p)
        if t:
            cells.append(f"{p} round {t['round_seconds']:.1f} s (device CPU {t['device_cpu_s_per_step']:.3f} s/step, "
                         f"load {t['machine']['load_before'][0]} -> {t['machine']['load_after'][0]})")
    return cells


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def table(report: dict[str, Any]) -> list[str]:
    """The report as a Markdown table (README "Performance")."""
    profiles = report["profiles"]
    head = ["method", "held-out loss", "accuracy", "device peak MB", "device compute s/step",
            "MB / device / round", *[f"round s, {p}" for p in profiles], *[f"device CPU s/step, {p}" for p in profiles]]
    rows = []
    for method, r in report["methods"].items():
        timed_ = [r["rounds_timed"].get(p) for p in profiles]
        acc = r["eval_accuracy"]
        cells = [method, f"{r['eval_loss']:.4f}", "-" if acc is None else f"{acc:.3f}",
                 f"{r['device_peak_rss_bytes'] / 1e6:.0f}", f"{r['device_compute_s_per_step']:.3f}",
                 _mb(r["bytes_per_device_per_round"]),
                 *["-" if t is None else f"{t['round_seconds']:.1f}" for t in timed_],
                 *["-" if t is None else f"{t['device_cpu_s_per_step']:.3f}" for t in timed_]]
        rows.append(cells)
    return markdown_table(head, rows)


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    rows = [report["methods"][m] for m in methods]
    panels = [("held-out loss", [r["eval_loss"] for r in rows]),
              ("device peak memory (MB)", [r["device_peak_rss_bytes"] / 1e6 for r in rows]),
              ("MB per device per round", [(r["bytes_per_device_per_round"] or 0) / 1e6 for r in rows])]
    panels += [(f"round wall seconds, {p}", [r["rounds_timed"].get(p, {}).get("round_seconds", 0.0) for r in rows])
               for p in report["profiles"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(range(len(methods)), values, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{report['model']} on {report['data']}: {report['users']} devices, {report['rounds']} rounds of "
                 f"{report['local_steps']} steps (load {report['load_before'][0]} -> {report['load_after'][0]})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitllm bench compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write the comparison's bars here (PNG)")
    p.add_argument("--quick", action="store_true", help="2 devices, 2 rounds of 2 steps of 8 x 64, wifi and 4g")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--data", default="trec")
    p.add_argument("--split", default="1,3")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate of every method (default: the task's)")
    p.add_argument("--max-examples", type=int, default=256, help="train examples per client")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out examples per client")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profiles", default="wifi,4g", help="the devices' links in the timed rounds (comma-separated)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process part and of every process "
                                                          "in the timed rounds (0: one per core)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    return p


QUICK = {"users": 2, "edges": 1, "rounds": 2, "local_steps": 2, "batch_size": 8, "seq_len": 64, "max_examples": 64,
         "eval_examples": 32}


def main(argv: list[str] | None = None) -> int:
    from shared.lab.bench.timing import save

    args = build_parser().parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.methods = [m for m in args.methods.split(",") if m]
    args.profiles = [p for p in args.profiles.split(",") if p]
    if set(args.methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(set(args.methods) - set(METHODS))}: choose from {', '.join(METHODS)}")
    started = time.perf_counter()
    report = bench_compare(args)
    report["elapsed_s"] = time.perf_counter() - started  # the whole bench, for its "under 30 minutes" target
    report["command"] = "splitllm bench compare " + " ".join(argv if argv is not None else [])
    print("\n".join(table(report)))
    save(report, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
