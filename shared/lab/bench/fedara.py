"""``splitllm bench fedara``: FedARA against fixed-rank LoRA (FedAvg) on non-IID TREC, same seeds.

Both runs use the same model, data partition (Dirichlet over labels), split, local steps, batch,
learning rate (the project's default for classification) and seed; they differ only in the adapter
form and the algorithm: LoRA rank r with FedAvg, or SVD-form adapters of initial rank r with FedARA
(target average rank r/3, 1 warm-up round, 2 final rounds, cubic decay over the rounds between).

Adapter bytes are counted at the in-process links, on every hop (cloud-edge and edge-user, both
directions): the encoded size of every ``start`` message (the round's download: plans and adapter
tensors) and every ``update`` message (the uploads: adapter tensors, FedARA's indices and scores,
and the round metrics), for the training and the evaluation phase of each round, plus their small
acknowledgements. Step messages (activations and gradients) are not counted. ``adapter_tensor_bytes``
is the raw size of the tensors those messages carry (numel x itemsize), without metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ENDPOINTS = ("start", "update")


def link_bytes(links: list[Any]) -> int:
    total = 0
    for link in links:
        by = link.stats.snapshot()["by_endpoint"]
        total += sum(sum(by.get(e, [0, 0, 0])[:2]) for e in ENDPOINTS)
    return total


class _TensorBytes:
    """Raw bytes of the tensors in the start and update messages that cross ``links``."""

    def __init__(self, links: list[Any]) -> None:
        self.total = 0
        for link in links:
            original = link.request

            def request(endpoint: str, msg: Any, _original: Any = original) -> Any:
                if endpoint in ENDPOINTS:
                    self.total += sum(t.numel() * t.element_size() for t in msg.tensors.values())
                return _original(endpoint, msg)

            link.request = request


def _mean_last(rounds: list[dict[str, Any]], n: int) -> float:
    """Mean held-out accuracy of the last ``n`` rounds (the final round alone swings by a few points under non-IID data)."""
    values = [r["eval_accuracy"] for r in rounds[1:]][-n:]
    return sum(values) / max(len(values), 1)


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from shared.config.round import RoundConfig
    from shared.fl.fedara import initial_triplets
    from shared.lab.sim import SimConfig, Simulation
    from shared.model.adapters import LoraSettings

    fedara = method == "fedara"
    algorithm_config: dict[str, Any] = {}
    if fedara:
        algorithm_config = {"total_rounds": args.rounds, "warmup_rounds": args.warmup_rounds,
                            "final_rounds": args.final_rounds, "target_rank": args.target_rank}
    cfg = SimConfig(model=args.model, data=args.data, users=args.users, edges=args.edges, rounds=args.rounds,
                    round=RoundConfig(local_steps=args.local_steps, batch_size=args.batch_size, deadline=None,
                                      algorithm="fedara" if fedara else "fedavg", config=algorithm_config),
                    max_len=args.max_len,
                    partition="dirichlet", alpha=args.dirichlet_alpha, max_examples_per_client=args.max_examples,
                    eval_examples_per_client=args.eval_examples, lora=LoraSettings(rank=args.rank),
                    adapter="svd" if fedara else "lora", seed=args.seed, baseline_eval=False)
    sim = Simulation(cfg)
    links = sim.user_links + sim.edge_links
    tensors = _TensorBytes(links)
    rounds: list[dict[str, Any]] = []
    start = time.perf_counter()
    base = sim.evaluate_only()  # round 0: the untrained adapters (same for both: dW = 0 at the start)
    rounds.append({"round": 0, "eval_accuracy": base.get("eval_accuracy"), "eval_loss": base.get("eval_loss"),
                   "train_loss": None, "adapter_bytes": 0, "adapter_tensor_bytes": 0, "cumulative_adapter_bytes": 0,
                   "seconds": base["seconds"]})
    link0, tensor0 = link_bytes(links), tensors.total
    cumulative = 0
    for _ in range(args.rounds):
        before, tensor_before = link_bytes(links), tensors.total
        row = sim.run_round()
        moved = link_bytes(links) - before
        cumulative += moved
        entry = {"round": row["round"], "eval_accuracy": row.get("eval_accuracy"), "eval_loss": row["eval_loss"],
                 "train_loss": row["train_loss"], "adapter_bytes": moved,
                 "adapter_tensor_bytes": tensors.total - tensor_before, "cumulative_adapter_bytes": cumulative,
                 "seconds": row["seconds"]}
        if fedara:
            algorithm = sim.coordinator.strategy_for(sim.request())
            trained = algorithm.history[-2]["active"] if len(algorithm.history) > 1 else \
                sum(len(initial_triplets(algorithm.config, r)) for r in algorithm.full_rank.values())
            entry["active_triplets"] = trained
            entry["next_budget"] = algorithm.history[-1]["budget"]
            entry["pruned_modules"] = len(algorithm.history[-1]["pruned_modules"])
        rounds.append(entry)
        print(f"  {method:>6} round {entry['round']:>2}: acc {entry['eval_accuracy']:.4f}  "
              f"adapter bytes {moved / 1e6:7.3f} MB (cumulative {cumulative / 1e6:7.3f} MB)"
              + (f"  triplets {entry['active_triplets']}" if fedara else ""), flush=True)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "method": method, "adapter": cfg.adapter, "algorithm": cfg.round.algorithm, "algorithm_config": algorithm_config,
        "rank": args.rank, "final_accuracy": rounds[-1]["eval_accuracy"],
        "mean_last3_accuracy": _mean_last(rounds, 3), "adapter_bytes": link_bytes(links) - link0,
        "adapter_tensor_bytes": tensors.total - tensor0, "seconds": seconds, "rounds": rounds,
    }
    if fedara:
        algorithm = sim.coordinator.strategy_for(sim.request())
        out["final_ranks"] = algorithm.history[-1]["ranks"] if algorithm.history else {}
        out["schedule"] = [{k: v for k, v in h.items() if k != "ranks"} for h in algorithm.history]
    return out


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in report["runs"]:
        xs = [r["round"] for r in run["rounds"]]
        acc_ax.plot(xs, [r["eval_accuracy"] for r in run["rounds"]], marker="o", label=run["method"])
        bytes_ax.plot(xs, [r["cumulative_adapter_bytes"] / 1e6 for r in run["rounds"]], marker="o", label=run["method"])
    acc_ax.set(xlabel="round", ylabel="held-out accuracy", title=f"{report['model']} on {report['data']}, "
                                                                    f"Dirichlet alpha {report['dirichlet_alpha']}")
    bytes_ax.set(xlabel="round", ylabel="cumulative adapter MB (start + update messages)", title="adapter traffic")
    for ax in (acc_ax, bytes_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitllm bench fedara",
                                description="FedARA against fixed-rank LoRA: final accuracy and adapter bytes moved")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write accuracy and cumulative adapter bytes per round here (PNG)")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--data", default="trec")
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
    p.add_argument("--target-rank", type=float, default=None, help="FedARA's target average rank (default rank / 3)")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--final-rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="lora,fedara", help="comma-separated subset of lora,fedara")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - {"lora", "fedara"}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}: choose from lora, fedara")
    runs = []
    for method in methods:
        print(f"{method}: {args.model} on {args.data}, {args.users} users / {args.edges} edges, {args.rounds} rounds",
              flush=True)
        runs.append(run_method(method, args))
    report: dict[str, Any] = {
        "model": args.model, "data": args.data, "users": args.users, "edges": args.edges, "rounds": args.rounds,
        "dirichlet_alpha": args.dirichlet_alpha, "local_steps": args.local_steps, "batch_size": args.batch_size,
        "max_len": args.max_len, "seed": args.seed, "rank": args.rank,
        "bytes": "encoded start + update messages on every link, train and eval phases (see shared/bench_fedara.py)",
        "runs": runs,
    }
    by = {r["method"]: r for r in runs}
    if {"lora", "fedara"} <= set(by):
        lora, fedara = by["lora"], by["fedara"]
        report["bytes_ratio"] = lora["adapter_bytes"] / fedara["adapter_bytes"]
        report["tensor_bytes_ratio"] = lora["adapter_tensor_bytes"] / fedara["adapter_tensor_bytes"]
        report["accuracy_delta_points"] = 100.0 * (fedara["final_accuracy"] - lora["final_accuracy"])
        report["last3_accuracy_delta_points"] = 100.0 * (fedara["mean_last3_accuracy"] - lora["mean_last3_accuracy"])
        report["target"] = ">= 2x fewer adapter bytes at accuracy no more than 1 point lower"
        report["target_met"] = report["bytes_ratio"] >= 2.0 and report["accuracy_delta_points"] >= -1.0
    print(f"{'method':>8}  {'final_acc':>9}  {'adapter_MB':>10}  {'tensor_MB':>9}  {'seconds':>8}")
    for r in runs:
        print(f"{r['method']:>8}  {r['final_accuracy']:>9.4f}  {r['adapter_bytes'] / 1e6:>10.3f}  "
              f"{r['adapter_tensor_bytes'] / 1e6:>9.3f}  {r['seconds']:>8.1f}")
    if "bytes_ratio" in report:
        print(f"LoRA / FedARA adapter bytes {report['bytes_ratio']:.2f}x (tensors {report['tensor_bytes_ratio']:.2f}x); "
              f"accuracy FedARA - LoRA {report['accuracy_delta_points']:+.2f} points (mean of the last 3 rounds "
              f"{report['last3_accuracy_delta_points']:+.2f}); target met: {report['target_met']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
