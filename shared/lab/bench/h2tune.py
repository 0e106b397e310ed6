"""``splitllm bench h2tune``: H2Tune against local-only training and naive heterogeneous LoRA, on clients that differ
in base model, task and rank, over several seeds.

The clients (``--clients``, ``model/data/rank`` each; default minilm-l6/trec/8, minilm-l6/sms_spam/16,
smollm2-135m/sentiment/32 with smollm2-135m as a sequence classifier) each hold one task's data (one
client per data set). Every method runs the same rounds, local steps, batch, learning rate, max length
and seed, in the in-process simulator (one edge per model, each model at its default split):

* ``local``: each client alone, a federation of one (FedAvg over one user is local training), under the user id
  it has in the federations (a user's id seeds its batch order), so each client sees the same batches in every
  method and a client alone in its model trains exactly as in ``naive``;
* ``naive``: one federation, FedAvg within each model over its users' zero-padded ranks (a model's
  adapters have the largest rank its users declare), task heads per task, nothing across models;
* ``h2tune``: one federation, ``"algorithm": "h2tune"`` (only sparsified middle matrices shared, across
  models too).

Accuracy: each task's held-out accuracy after the last round, and their average. With several seeds:
the mean and the standard error over seeds. Bytes: the encoded ``start`` and ``update`` messages on every
link, train and eval phases, per round (for ``local``, summed over the clients' runs); activations and
gradients (step messages) are not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from shared.lab.bench.fedara import link_bytes
from shared.lab.bench.timing import write_json

METHODS = ("local", "naive", "h2tune")


def parse_clients(text: str) -> list[tuple[str, str, int]]:
    out = []
    for item in text.split(","):
        try:
            model, data, rank = item.rsplit("/", 2)
            out.append((model, data, int(rank)))
        except ValueError:
            raise SystemExit(f"--clients takes model/data/rank items, comma-separated (got '{item}')") from None
    return out


def sim_config(args: argparse.Namespace, clients: list[tuple[str, str, int]], seed: int, algorithm: str,
               user_ids: list[str] | None = None) -> Any:
    from shared.config.round import RoundConfig
    from shared.lab.sim import SimConfig
    from shared.model.adapters import LoraSettings

    models = [m for m, _, _ in clients]
    return SimConfig(model=models[0], data=clients[0][1], users=len(clients), edges=1, rounds=args.rounds,
                     user_models=models, user_data=[d for _, d, _ in clients], ranks=[r for _, _, r in clients],
                     lora=LoraSettings(rank=min(r for _, _, r in clients)), max_len=args.max_len,
                     max_examples_per_client=args.max_examples, eval_examples_per_client=args.eval_examples,
                     seed=seed, baseline_eval=False, user_ids=user_ids or [],
                     round=RoundConfig(local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                                       deadline=None, algorithm=algorithm,
                                       config=dict(args.h2tune_config) if algorithm == "h2tune" else {}))


def _simulate(config: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """A simulation's rows and the adapter bytes (start + update messages) each round moved."""
    from shared.lab.sim import Simulation

    sim = Simulation(config)
    links = sim.user_links + sim.edge_links
    rows, moved = [], []
    for _ in range(config.rounds):
        before = link_bytes(links)
        rows.append(sim.run_round())
        moved.append(link_bytes(links) - before)
    return rows, moved


def _task_name(model: str, data: str) -> str:
    from shared.config.federation import deployment_name

    return f"{deployment_name(model)}/{data}"


def run_seed(method: str, args: argparse.Namespace, clients: list[tuple[str, str, int]], seed: int) -> dict[str, Any]:
    """One method at one seed: each task's accuracy per round, and the bytes each round moved."""
    per_task: dict[str, list[float]] = {}
    if method == "local":
        moved = [0] * args.rounds
        for i, client in enumerate(clients):  # under its id in the federation: the same batches as there
            rows, client_moved = _simulate(sim_config(args, [client], seed, "fedavg", [f"user-{i}"]))
            per_task[_task_name(client[0], client[1])] = [r["eval_accuracy"] for r in rows]
            moved = [a + b for a, b in zip(moved, client_moved)]
    else:
        rows, moved = _simulate(sim_config(args, clients, seed, "h2tune" if method == "h2tune" else "fedavg"))
        for name in rows[-1]["tasks"]:
            per_task[name] = [r["tasks"][name]["eval_accuracy"] for r in rows]
    final = {name: accs[-1] for name, accs in per_task.items()}
    return {"seed": seed, "accuracy": final, "average": statistics.fmean(final.values()), "per_round": per_task,
            "bytes_per_round": moved}


def _mean_se(values: list[float]) -> dict[str, float]:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "se": se}


def summarise(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = sorted(runs[0]["accuracy"])
    return {"method": method, "accuracy": {t: _mean_se([r["accuracy"][t] for r in runs]) for t in tasks},
            "average": _mean_se([r["average"] for r in runs]),
            "bytes_per_round": statistics.fmean(b for r in runs for b in r["bytes_per_round"]), "runs": runs}


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    tasks = [*sorted(methods[0]["accuracy"]), "average"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        stats = [m["accuracy"][t] if t != "average" else m["average"] for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], [s["mean"] for s in stats], width,
               yerr=[s["se"] for s in stats], capsize=3, label=f"{m['method']} ({m['bytes_per_round'] / 1e6:.2f} MB/round)")
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set(ylabel="held-out accuracy after the last round", title=f"{len(report['seeds'])} seeds, "
                                                                   f"{report['rounds']} rounds (mean, standard error)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitllm bench h2tune", description="H2Tune against local-only training and "
                                "naive heterogeneous LoRA: per-task accuracy, average, bytes per round")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write per-task accuracy per method here (PNG)")
    p.add_argument("--clients", default="minilm-l6/trec/8,minilm-l6/sms_spam/16,smollm2-135m/sentiment/32")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the project's for classification)")
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--max-examples", type=int, default=256, help="train examples per client")
    p.add_argument("--eval-examples", type=int, default=128, help="held-out examples per client")
    p.add_argument("--h2tune-config", type=json.loads, default={"keep": 0.5}, help="H2Tune's options (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clients, seeds = parse_clients(args.clients), [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    if not seeds or not methods:
        raise SystemExit("--seeds and --methods each need at least one item")
    if set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(set(methods) - set(METHODS))}: choose from {', '.join(METHODS)}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:  # seed by seed, every method, the report rewritten after each: a cut-off run keeps its seeds
        for method in methods:
            runs[method].append(run_seed(method, args, clients, seed))
            last = runs[method][-1]
            print(f"  {method:>6} seed {seed}: " + "  ".join(f"{t} {a:.4f}" for t, a in sorted(last["accuracy"].items()))
                  + f"  average {last['average']:.4f}", flush=True)
        report = {"clients": [{"model": m, "data": d, "rank": r} for m, d, r in clients],
                  "seeds": seeds[:seeds.index(seed) + 1],
                  "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr,
                  "max_len": args.max_len, "max_examples": args.max_examples, "eval_examples": args.eval_examples,
                  "h2tune_config": args.h2tune_config, "methods": [summarise(m, runs[m]) for m in methods],
                  "bytes": "encoded start + update messages on every link, train and eval phases, per round"}
        write_json(report, args.json)
    summaries = report["methods"]
    tasks = sorted(summaries[0]["accuracy"])
    print(f"{'method':>8}  " + "  ".join(f"{t:>24}" for t in tasks) + f"  {'average':>15}  {'MB/round':>8}")
    for s in summaries:
        cells = [f"{s['accuracy'][t]['mean']:.4f} +- {s['accuracy'][t]['se']:.4f}" for t in tasks]
        print(f"{s['method']:>8}  " + "  ".join(f"{c:>24}" for c in cells)
              + f"  {s['average']['mean']:.4f} +- {s['average']['se']:.4f}  {s['bytes_per_round'] / 1e6:>8.3f}")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
