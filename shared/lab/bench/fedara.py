"""``splitllm bench fedara``: FedARA against fixed-rank LoRA (FedAvg) on non-IID TREC, in two settings.

Settings: ``whole`` puts every block on the device (cut a = b = L: the papers' setting, where every
adapter travels); ``split`` is the three-tier deployment (default cut 1,3: the device's and the
edge's adapters travel, the cloud's never leave it). Both methods share the model, data partition
(Dirichlet over labels), local steps, batch and seed; they differ in the adapter form and the
algorithm: LoRA rank r with FedAvg, or SVD-form adapters of initial rank r with FedARA (per-tier
budget over the tiers whose adapters travel, target average rank ``--target-rank``, warm-up and
final rounds, cubic decay between). The protocol (``shared.lab.bench.protocol``): each method's
learning rate from the same grid at a tuning seed, then ``--seeds`` seeds; quality is the mean
held-out accuracy of the last 3 rounds; figures are means with standard errors over seeds,
comparisons paired by seed.

Adapter bytes are counted at the in-process links, on every hop (cloud-edge and edge-user, both
directions): the encoded size of every ``start`` message (the round's download: plans and adapter
tensors) and every ``update`` message (the uploads: adapter tensors, FedARA's indices and scores,
and the round metrics), for the training and the evaluation phase of each round, plus their small
acknowledgements. Step messages (activations and gradients) are not counted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from shared.lab.bench.protocol import LR_GRID, TUNING_SEED, fmt, mean_last, summary, tune_and_run
from shared.lab.bench.timing import save

ENDPOINTS = ("start", "update")
METHODS = ("lora", "fedara")
SETTINGS = ("whole", "split")


def link_bytes(links: list[Any]) -> int:
    total = 0
    for link in links:
        by = link.stats.snapshot()["by_endpoint"]
        total += sum(sum(by.get(e, [0, 0, 0])[:2]) for e in ENDPOINTS)
    return total


def cut_of(setting: str, args: argparse.Namespace, num_layers: int) -> tuple[int, int]:
    if setting == "whole":
        return num_layers, num_layers
    a, b = (int(x) for x in args.split.split(","))
    return a, b


def fedara_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"total_rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "final_rounds": args.final_rounds,
            "target_rank": args.target_rank, "ortho_weight": args.ortho_weight, "e_lr_scale": args.e_lr_scale}


def run_once(method: str, setting: str, lr: float, seed: int, args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """One simulation of ``method`` in ``setting``: per-round accuracy, adapter bytes, FedARA's allocation."""
    from shared.config.round import RoundConfig
    from shared.lab.sim import SimConfig, Simulation
    from shared.model.adapters import LoraSettings
    from shared.model.sources import resolve_model

    fedara = method == "fedara"
    split = cut_of(setting, args, resolve_model(args.model).num_layers)
    cfg = SimConfig(model=args.model, data=args.data, users=args.users, edges=args.edges, rounds=args.rounds, split=split,
                    round=RoundConfig(local_steps=args.local_steps, batch_size=args.batch_size, lr=lr, deadline=None,
                                      algorithm="fedara" if fedara else "fedavg",
                                      config=fedara_config(args) if fedara else {}),
                    max_len=args.max_len, partition="dirichlet", alpha=args.dirichlet_alpha,
                    max_examples_per_client=args.max_examples, eval_examples_per_client=args.eval_examples,
                    lora=LoraSettings(rank=args.rank), adapter="svd" if fedara else "lora", seed=seed,
                    baseline_eval=False)
    sim = Simulation(cfg)
    links = sim.user_links + sim.edge_links
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    cumulative = 0
    for _ in range(args.rounds):
        before = link_bytes(links)
        row = sim.run_round()
        moved = link_bytes(links) - before
        cumulative += moved
        entry = {"round": row["round"], "eval_accuracy": row.get("eval_accuracy"), "eval_loss": row["eval_loss"],
                 "train_loss": row["train_loss"], "adapter_bytes": moved, "cumulative_adapter_bytes": cumulative,
                 "wall_seconds": row["seconds"]}
        if fedara:
            history = sim.coordinator.strategy_for(sim.request()).history
            trained = history[-2] if len(history) > 1 else None  # the allocation this round trained with
            entry["trained_by_tier"] = trained["active_by_tier"] if trained else None
            entry["next"] = {k: history[-1][k] for k in ("budget", "active_by_tier", "revived", "pruned_modules")}
        rows.append(entry)
    accuracy = [r["eval_accuracy"] for r in rows]
    out = {"method": method, "setting": setting, "split": list(split), "lr": lr, "seed": seed,
           "mean_last3_accuracy": mean_last(accuracy), "final_accuracy": accuracy[-1], "adapter_bytes": cumulative,
           "wall_seconds": time.perf_counter() - started, "rounds": rows}
    log(f"    {setting:>5} {method:>6} lr {lr:g} seed {seed}: accuracy {' '.join(f'{a:.3f}' for a in accuracy)}; "
        f"last 3 {out['mean_last3_accuracy']:.4f}; adapter {cumulative / 1e6:.2f} MB; {out['wall_seconds']:.0f} s wall")
    return out


def run_setting(setting: str, args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Both methods in one setting: each one's grid at the tuning seed, then its runs at the reported seeds."""
    out: dict[str, Any] = {"methods": {}}
    for method in METHODS:
        lr, tried, runs = tune_and_run(method, lambda lr, seed, m=method: run_once(m, setting, lr, seed, args, log), args)
        out["methods"][method] = {
            "lr": lr, "grid": [{"lr": t["lr"], "seed": t["seed"], "mean_last3_accuracy": t["quality"],
                                "adapter_bytes": t["result"]["adapter_bytes"]} for t in tried],
            "mean_last3_accuracy": summary([r["mean_last3_accuracy"] for r in runs]),
            "final_accuracy": summary([r["final_accuracy"] for r in runs]),
            "adapter_bytes": summary([r["adapter_bytes"] for r in runs]), "runs": runs}
    lora, fedara = (out["methods"][m]["runs"] for m in METHODS)
    out["bytes_ratio"] = summary([a["adapter_bytes"] / b["adapter_bytes"] for a, b in zip(lora, fedara)])
    out["last3_accuracy_delta_points"] = summary([100 * (b["mean_last3_accuracy"] - a["mean_last3_accuracy"])
                                                  for a, b in zip(lora, fedara)])
    out["target_met"] = out["bytes_ratio"]["mean"] >= 2.0 and out["last3_accuracy_delta_points"]["mean"] >= -1.0
    return out


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = list(report["settings"])
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        for method, entry in report["settings"][setting]["methods"].items():
            acc = np.array([[r["eval_accuracy"] for r in run["rounds"]] for run in entry["runs"]])
            mb = np.array([[r["cumulative_adapter_bytes"] / 1e6 for r in run["rounds"]] for run in entry["runs"]])
            xs = np.arange(1, acc.shape[1] + 1)
            se = acc.std(0, ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else np.zeros(acc.shape[1])
            label = f"{method} (lr {entry['lr']:g})"
            row[0].plot(xs, acc.mean(0), marker="o", ms=3, label=label)
            row[0].fill_between(xs, acc.mean(0) - se, acc.mean(0) + se, alpha=0.2)
            row[1].plot(xs, mb.mean(0), marker="o", ms=3, label=label)
        split = report["settings"][setting]["methods"]["lora"]["runs"][0]["split"]
        row[0].set(xlabel="round", ylabel="held-out accuracy (mean ± SE over seeds)", title=f"{setting}: cut {split}")
        row[1].set(xlabel="round", ylabel="cumulative adapter MB (start + update messages)", title="adapter traffic")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitllm bench fedara",
                                description="FedARA against fixed-rank LoRA: held-out accuracy and adapter bytes moved")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write accuracy and cumulative adapter bytes per round here (PNG)")
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny-bert, 2 users, 3 rounds, 1 seed, no grid")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of whole,split")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--data", default="trec")
    p.add_argument("--split", default="1,3", help="the cut of the split setting")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dirichlet-alpha", type=float, default=0.3)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--max-examples", type=int, default=256, help="train examples per client")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out examples per client")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank and FedARA's initial rank")
    p.add_argument("--target-rank", type=float, default=2.0, help="FedARA's target average rank per budgeted module")
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument("--final-rounds", type=int, default=2)
    p.add_argument("--ortho-weight", type=float, default=0.1)
    p.add_argument("--e-lr-scale", type=float, default=16.0)
    p.add_argument("--grid", default=",".join(str(x) for x in LR_GRID), help="learning rates each method is tuned over")
    p.add_argument("--lrs", default="", help="skip the grid for these methods: METHOD=LR,... (e.g. lora=5e-3)")
    p.add_argument("--tuning-seed", type=int, default=TUNING_SEED)
    p.add_argument("--seeds", type=int, default=3, help="reported seeds: --seed .. --seed + N - 1")
    p.add_argument("--seed", type=int, default=0)
    return p


QUICK = {"model": "tiny-bert", "users": 2, "edges": 1, "rounds": 3, "local_steps": 1, "batch_size": 2, "max_len": 16,
         "max_examples": 4, "eval_examples": 2, "seeds": 1, "grid": "5e-3", "warmup_rounds": 2, "final_rounds": 1}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    settings = [s for s in args.settings.split(",") if s]
    if set(settings) - set(SETTINGS):
        raise SystemExit(f"unknown settings {sorted(set(settings) - set(SETTINGS))}: choose from {', '.join(SETTINGS)}")
    started = time.perf_counter()
    report: dict[str, Any] = {"config": vars(args), "fedara_config": fedara_config(args),
                              "protocol": {"grid": args.grid, "lrs_given": args.lrs, "tuning_seed": args.tuning_seed,
                                           "seeds": list(range(args.seed, args.seed + args.seeds)),
                                           "quality": "mean held-out accuracy of the last 3 rounds",
                                           "bytes": "encoded start + update messages on every link, train and eval"},
                              "settings": {}}
    for setting in settings:
        print(f"{setting}: {args.model} on {args.data}, {args.users} users / {args.edges} edges, {args.rounds} rounds",
              flush=True)
        report["settings"][setting] = run_setting(setting, args)
    report["bench_seconds"] = time.perf_counter() - started
    print(f"\n{'setting':>7}  {'method':>6}  {'lr':>7}  {'last-3 accuracy':>15}  {'adapter MB':>14}")
    for setting, entry in report["settings"].items():
        for method, m in entry["methods"].items():
            print(f"{setting:>7}  {method:>6}  {m['lr']:>7g}  {fmt(m['mean_last3_accuracy']):>15}  "
                  f"{fmt(m['adapter_bytes'], 2, 1e-6):>14}")
        print(f"{setting:>7}  LoRA / FedARA bytes {fmt(entry['bytes_ratio'], 2)}x; accuracy FedARA - LoRA "
              f"{fmt(entry['last3_accuracy_delta_points'], 2)} points; target met: {entry['target_met']}")
    print(f"bench: {report['bench_seconds'] / 60:.1f} min")
    save(report, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
