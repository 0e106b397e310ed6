"""``splitllm bench droppeft``: DropPEFT against plain split LoRA (FedAvg) on heterogeneous devices.

Two simulations with the same seeds, data, split and device slowdowns (users cycling 1x, 2x, 4x):
plain split LoRA (``fedavg``) and ``droppeft`` (bandit-chosen STLD ratios per user, personal last
block). Reported:

* time to a target eval loss: the plain run's eval loss after 80 % of its rounds. A round's time is
  modelled as the devices training in parallel: the MAX over its users of their round seconds
  (``metrics["users"][u]["seconds"]``: the user's whole chain of steps, user, edge and cloud compute
  and transfers, with the device's slowdown, which the simulator applies by sleeping). The
  simulator itself runs the users one after another, so its wall time is the SUM; that is kept in
  the rounds as ``wall_seconds`` but not used. Evaluation time is not counted. The two methods'
  rounds are interleaved so that other load on the machine falls on both. A second,
  machine-independent clock is reported beside it (``block_cost``, see ``add_block_cost``).
* user-tier activation memory per training step: the bytes of the distinct tensors autograd saves
  for backward during the user tier's forward (``torch.autograd.graph.saved_tensors_hooks``;
  parameters and their views excluded), over the same training batches at each ratio; mean and max
  over steps. ``user_peak_memory_bytes`` is the mean per-step figure at ratio 0 (plain) and at the
  largest arm (0.5, DropPEFT). The same is measured with the whole model on the device (split L,L),
  the setting of the paper's memory figures, for reference.
* final quality: eval loss and accuracy of the last round (DropPEFT evaluates each user with its
  personal layers, as it would be used).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from shared.config.round import RoundConfig
from shared.fl.droppeft import DropPEFTConfig, DropPEFTStrategy, skip_mask
from shared.protocol.enums import Tier
from shared.protocol.messages import RoundPlan
from shared.data.batching import BatchSampler
from shared.lab.sim import SimConfig, Simulation

TARGETS = {"speedup": 1.3, "memory_reduction": 0.25, "quality_drop": 0.01}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitllm bench droppeft", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--data", default="trec")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--slowdowns", default="1,2,4", help="per-user compute slowdowns, cycled")
    p.add_argument("--split", default="3,5", help="split points a,b (the user tier holds blocks [0, a))")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default: the task's (5e-3 for classification)")
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--personal-layers", default="last", help="'last', '' (none) or comma-separated block indices")
    p.add_argument("--algorithm-config", default="{}", help="more droppeft options (JSON object)")
    p.add_argument("--target-fraction", type=float, default=0.8, help="target = plain eval loss after this share of rounds")
    p.add_argument("--memory-steps", type=int, default=40, help="training batches the memory probe averages over")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write the curves here (PNG)")
    return p.parse_args(argv)


# --- time: the two runs -------------------------------------------------------------------------------


def _config(args: argparse.Namespace, algorithm: str, algorithm_config: dict[str, Any]) -> SimConfig:
    a, b = (int(x) for x in args.split.split(","))
    return SimConfig(model=args.model, data=args.data, users=args.users, edges=args.edges, rounds=args.rounds,
                     split=(a, b), round=RoundConfig(local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                                                     algorithm=algorithm, config=algorithm_config, deadline=None),
                     max_len=args.max_len, max_examples_per_client=args.max_examples or None,
                     eval_examples_per_client=args.eval_examples, seed=args.seed,
                     slowdowns=[float(x) for x in args.slowdowns.split(",") if x])


class MethodRun:
    """One method's simulation, advanced a round at a time (the two methods' rounds are interleaved,
    so that load from other processes on the machine falls on both alike)."""

    def __init__(self, method: str, cfg: SimConfig, log: Any = print) -> None:
        self.method, self.cfg, self.log = method, cfg, log
        self.sim = Simulation(cfg)
        self.num_layers = self.sim.source.num_layers
        self.slowdown = {u.user_id: u.slowdown for u in self.sim.users}
        base = self.sim.evaluate_only()
        self.rows: list[dict[str, Any]] = [{
            "round": 0, "eval_loss": base["eval_loss"], "eval_accuracy": base.get("eval_accuracy"), "train_loss": None,
            "parallel_seconds": 0.0, "cumulative_seconds": 0.0, "wall_seconds": base["seconds"]}]
        self.cumulative = 0.0

    def algorithm(self) -> Any:
        """The coordinator's persistent instance of this run's algorithm (the baseline evaluation adds a fedavg one)."""
        return self.sim.coordinator.strategy_for(self.sim.request())

    def round(self) -> dict[str, Any]:
        """One round; its modelled time is the max over users of their round seconds."""
        row = self.sim.run_round()
        users = self.sim.coordinator.rounds[row["round"]].metrics["users"]
        user_seconds = {u: float(m["seconds"]) for u, m in users.items()}
        parallel = max(user_seconds.values())
        self.cumulative += parallel
        out = {"round": row["round"], "eval_loss": row["eval_loss"], "eval_accuracy": row.get("eval_accuracy"),
               "train_loss": row["train_loss"], "parallel_seconds": parallel, "cumulative_seconds": self.cumulative,
               "wall_seconds": row["seconds"], "user_seconds": user_seconds,
               "user_compute_seconds": {u: float(m["user_compute_seconds"]) for u, m in users.items()}}
        algorithm = self.algorithm()
        if isinstance(algorithm, DropPEFTStrategy):
            entries = [h for h in algorithm.history if h["round"] == row["round"]]
            ratios = {h["user"]: h["ratio"] for h in entries}
            out["ratios"] = ratios
            out["rewards"] = {h["user"]: h["reward"] for h in entries}
            out["blocks_run_fraction"] = {
                u: _blocks_run(self.cfg.seed, row["round"], u, self.cfg.round.local_steps, r, self.num_layers,
                               algorithm.config.max_layer_ratio) for u, r in ratios.items()}
        self.rows.append(out)
        self.log(f"  {self.method:>8} round {row['round']:>3}: eval loss {row['eval_loss']:.4f}  "
                 f"acc {row.get('eval_accuracy') or 0:.4f}  parallel {parallel:6.2f} s  cumulative {self.cumulative:7.1f} s"
                 + (f"  ratios {[out['ratios'].get(u) for u in sorted(self.slowdown)]}" if "ratios" in out else ""))
        return out

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "algorithm": self.cfg.round.algorithm,
                               "algorithm_config": self.cfg.round.config, "slowdowns": self.slowdown, "rounds": self.rows}
        algorithm = self.algorithm()
        if isinstance(algorithm, DropPEFTStrategy):
            ratios = [str(r) for r in algorithm.config.ratios]
            out["bandit"] = {u: {"ratio_counts": dict(zip(ratios, p.counts)), "mean_rewards": dict(zip(ratios, p.means())),
                                 "best_ratio": algorithm.config.ratios[p.best()]}
                             for u, p in sorted(algorithm.policies.items())}
        return out


def _blocks_run(seed: int, round_id: int, user: str, steps: int, ratio: float, num_layers: int, cap: float) -> float:
    run = sum(num_layers - sum(skip_mask(seed, round_id, user, s, ratio, num_layers, cap)) for s in range(steps))
    return run / (steps * num_layers)


def time_to_target(rows: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    for row in rows:
        if row["eval_loss"] is not None and row["eval_loss"] <= target:
            return row["cumulative_seconds"], row["round"]
    return None, None


def add_block_cost(run: dict[str, Any], seed: int, split: tuple[int, int], num_layers: int, local_steps: int,
                   cap: float) -> None:
    """A machine-independent second clock: each round's cost in block-steps, devices in parallel.

    A block's forward + backward on a 1x device costs 1; on the user tier it costs the device's
    slowdown; edge and cloud blocks cost 1 (embeddings, head, transfers are left out). A round costs
    the max over users of the sum over its steps of the blocks each step runs (from the step masks).
    """
    cumulative = 0.0
    for row in run["rounds"]:
        if row["round"] == 0:
            row["block_cost"] = row["cumulative_block_cost"] = 0.0
            continue
        costs = {}
        for user, slowdown in run["slowdowns"].items():
            ratio = row.get("ratios", {}).get(user, 0.0)
            cost = 0.0
            for step in range(local_steps):
                skipped = skip_mask(seed, row["round"], user, step, ratio, num_layers, cap)
                cost += sum(slowdown if layer < split[0] else 1.0 for layer in range(num_layers) if not skipped[layer])
            costs[user] = cost
        row["block_cost"] = max(costs.values())
        cumulative += row["block_cost"]
        row["cumulative_block_cost"] = cumulative


def block_cost_to_target(rows: list[dict[str, Any]], target: float) -> float | None:
    for row in rows:
        if row["eval_loss"] is not None and row["eval_loss"] <= target:
            return row["cumulative_block_cost"]
    return None


# --- memory: saved activations of the user tier's forward ------------------------------------------------


def user_activation_bytes(model: str, data: str, split: tuple[int, int], ratios: list[float], steps: int,
                          batch_size: int, max_len: int, seed: int) -> dict[str, Any]:
    """Per training step, the bytes of distinct tensors saved for backward in the user tier's forward."""
    from shared.model.adapters import initial_state
    from shared.config.deployment import DataSpec
    from shared.model.sources import resolve_model
    from shared.config.deployment import ModelSpec
    from shared.runtime.tier import TierRuntime

    source = resolve_model(model)
    dataset = DataSpec(name=data, num_clients=1, seed=seed, max_len=max_len).load()
    spec = ModelSpec(model=model, split=split, task=dataset.task, num_labels=dataset.num_labels, seed=seed)
    runtime = TierRuntime(Tier.USER, source, spec)
    state = initial_state(runtime.slots.shapes(), seed)
    sampler = BatchSampler(source.tokenizer(), dataset.clients[0].train, dataset.task, max_len)
    batches = list(sampler.round_batches(seed, 1, "user-0", steps, batch_size))
    frozen = {p.untyped_storage().data_ptr() for p in runtime.partition.parameters()}
    out: dict[str, Any] = {"model": model, "split": list(split), "num_layers": source.num_layers,
                           "user_blocks": runtime.partition.layer_ids, "batch_shapes": sorted({tuple(b.input_ids.shape) for b in batches}),
                           "steps": steps, "by_ratio": {}}
    for ratio in ratios:
        config = {"ratio": ratio}
        plan = RoundPlan(round_id=1, user_id="user-0", local_steps=steps, batch_size=batch_size, seed=seed, lr=1e-3,
                         algorithm="droppeft", config=config,
                         extra={"ratio": ratio})
        session = runtime.open_session(plan, state)
        trainable = {p.untyped_storage().data_ptr() for p in session.params.values()}
        per_step: list[int] = []
        blocks: list[int] = []
        for step, batch in enumerate(batches):
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in frozen and ptr not in trainable:
                    seen[ptr] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                hidden = runtime.forward(session, None, batch.attention_mask, step, input_ids=batch.input_ids)
            per_step.append(sum(seen.values()))
            blocks.append(len(session.plugin.layers_to_run(step)))
            runtime.backward_and_step(session, [hidden], [torch.ones_like(hidden) * 1e-3])
            del hidden
        runtime.close_session(1, "user-0")
        out["by_ratio"][str(ratio)] = {"mean_bytes": sum(per_step) / len(per_step), "max_bytes": max(per_step),
                                       "min_bytes": min(per_step), "mean_user_blocks_run": sum(blocks) / len(blocks),
                                       "per_step_bytes": per_step}
    return out


# --- report ------------------------------------------------------------------------------------------------


def _plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in report["runs"]:
        xs = [r["cumulative_seconds"] for r in run["rounds"]]
        axes[0].plot(xs, [r["eval_loss"] for r in run["rounds"]], marker="o", ms=3, label=run["method"])
        if run["rounds"][0].get("eval_accuracy") is not None:
            axes[1].plot(xs, [r["eval_accuracy"] for r in run["rounds"]], marker="o", ms=3, label=run["method"])
    axes[0].axhline(report["target_eval_loss"], color="grey", ls="--", lw=1, label="target")
    axes[0].set(xlabel="modelled time (s, devices in parallel)", ylabel="eval loss", title="eval loss")
    axes[1].set(xlabel="modelled time (s, devices in parallel)", ylabel="eval accuracy", title="eval accuracy")
    mem = report["memory"]["split_user"]["by_ratio"]
    ratios = sorted(mem, key=float)
    axes[2].bar([float(r) for r in ratios], [mem[r]["mean_bytes"] / 1e6 for r in ratios], width=0.06,
                label=f"user tier, split {report['config']['split']}")
    whole = report["memory"].get("whole_model", {}).get("by_ratio", {})
    if whole:
        xs = sorted(whole, key=float)
        axes[2].plot([float(r) for r in xs], [whole[r]["mean_bytes"] / 1e6 for r in xs], "k.-",
                     label="whole model on the device")
    axes[2].set(xlabel="STLD ratio", ylabel="MB saved for backward per step (mean)", title="user-tier activation memory")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def run_bench(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    a, b = (int(x) for x in args.split.split(","))
    extra = json.loads(args.algorithm_config or "{}")
    from shared.model.sources import resolve_model

    num_layers = resolve_model(args.model).num_layers
    if args.personal_layers == "last":
        personal = [num_layers - 1]
    else:
        personal = [int(x) for x in args.personal_layers.split(",") if x]
    drop_config = {"personal_layers": personal, **extra}
    started = time.perf_counter()
    log(f"plain split LoRA (fedavg) and droppeft {drop_config}: {args.rounds} rounds each, interleaved")
    runs = [MethodRun("fedavg", _config(args, "fedavg", {}), log),
            MethodRun("droppeft", _config(args, "droppeft", drop_config), log)]
    for _ in range(args.rounds):
        for run in runs:
            run.round()
    plain, drop = (run.result() for run in runs)
    del runs
    target_round = max(1, math.ceil(args.target_fraction * args.rounds))
    target = plain["rounds"][target_round]["eval_loss"]
    arms = DropPEFTConfig.from_dict(drop_config).ratios
    log("memory probe (user tier forward, saved tensors)")
    memory = {"split_user": user_activation_bytes(args.model, args.data, (a, b), arms, args.memory_steps,
                                                  args.batch_size, args.max_len, args.seed),
              "whole_model": user_activation_bytes(args.model, args.data, (num_layers, num_layers), [0.0, max(arms)],
                                                   args.memory_steps, args.batch_size, args.max_len, args.seed)}
    split_mem = memory["split_user"]["by_ratio"]
    cap = DropPEFTConfig.from_dict(drop_config).max_layer_ratio
    for run, ratio in ((plain, 0.0), (drop, max(arms))):
        seconds, rounds = time_to_target(run["rounds"], target)
        add_block_cost(run, args.seed, (a, b), num_layers, args.local_steps, cap)
        last = run["rounds"][-1]
        run.update({"seconds_to_target": seconds, "rounds_to_target": rounds,
                    "block_cost_to_target": block_cost_to_target(run["rounds"], target),
                    "user_peak_memory_bytes": split_mem[str(ratio)]["mean_bytes"],
                    "user_peak_memory_max_step_bytes": split_mem[str(ratio)]["max_bytes"],
                    "memory_ratio": ratio, "final_eval_loss": last["eval_loss"], "final_accuracy": last["eval_accuracy"],
                    "total_seconds": last["cumulative_seconds"]})
    speedup = (plain["seconds_to_target"] / drop["seconds_to_target"]
               if drop["seconds_to_target"] and plain["seconds_to_target"] else None)
    cost_speedup = (plain["block_cost_to_target"] / drop["block_cost_to_target"]
                    if drop["block_cost_to_target"] and plain["block_cost_to_target"] else None)
    mem_reduction = 1.0 - drop["user_peak_memory_bytes"] / plain["user_peak_memory_bytes"]
    whole = memory["whole_model"]["by_ratio"]
    whole_reduction = 1.0 - whole[str(max(arms))]["mean_bytes"] / whole["0.0"]["mean_bytes"]
    acc_delta = (drop["final_accuracy"] - plain["final_accuracy"]) if plain["final_accuracy"] is not None else None
    loss_rel = drop["final_eval_loss"] / plain["final_eval_loss"] - 1.0
    checks = {
        "speedup_to_target": {"value": speedup, "target": f">= {TARGETS['speedup']}",
                              "met": speedup is not None and speedup >= TARGETS["speedup"]},
        "user_memory_reduction_at_max_ratio": {"value": mem_reduction, "target": f">= {TARGETS['memory_reduction']}",
                                               "met": mem_reduction >= TARGETS["memory_reduction"]},
        "final_accuracy_delta": {"value": acc_delta, "target": f">= -{TARGETS['quality_drop']}",
                                 "met": acc_delta is not None and acc_delta >= -TARGETS["quality_drop"]},
        "final_eval_loss_relative_delta": {"value": loss_rel, "target": f"<= {TARGETS['quality_drop']}",
                                           "met": loss_rel <= TARGETS["quality_drop"]},
    }
    return {"config": {**vars(args), "droppeft_config": drop_config},
            "time_model": "per round: max over users of their round seconds (devices in parallel, slowdown included); "
                          "evaluation excluded",
            "block_cost_model": add_block_cost.__doc__.split("\n")[0],
            "target_round": target_round, "target_eval_loss": target, "runs": [plain, drop], "memory": memory,
            "whole_model_memory_reduction_at_max_ratio": whole_reduction, "speedup": speedup,
            "block_cost_speedup": cost_speedup,
            "checks": checks, "bench_seconds": time.perf_counter() - started}


def print_table(report: dict[str, Any], log: Any = print) -> None:
    log(f"\ntarget eval loss {report['target_eval_loss']:.4f} (plain run after round {report['target_round']})")
    log(f"{'method':>9}  {'s_to_target':>11}  {'rounds':>6}  {'cost_to_target':>14}  {'user_act_MB/step':>16}  "
        f"{'final_loss':>10}  {'final_acc':>9}  {'total_s':>8}")
    for run in report["runs"]:
        s, c = run["seconds_to_target"], run.get("block_cost_to_target")
        log(f"{run['method']:>9}  {('%.1f' % s) if s is not None else 'not met':>11}  {str(run['rounds_to_target']):>6}  "
            f"{('%.0f' % c) if c is not None else 'not met':>14}  "
            f"{run['user_peak_memory_bytes'] / 1e6:>16.2f}  {run['final_eval_loss']:>10.4f}  "
            f"{(run['final_accuracy'] or 0):>9.4f}  {run['total_seconds']:>8.1f}")
    if report.get("block_cost_speedup") is not None:
        log(f"speedup to target: measured {report['speedup'] or float('nan'):.3f}x, block-cost model "
            f"{report['block_cost_speedup']:.3f}x")
    mem = report["memory"]["split_user"]["by_ratio"]
    log("user-tier activation MB per step by ratio (mean / max over steps, mean user blocks run): " + ", ".join(
        f"{r}: {v['mean_bytes'] / 1e6:.2f}/{v['max_bytes'] / 1e6:.2f} ({v['mean_user_blocks_run']:.2f})" for r, v in mem.items()))
    log(f"whole model on the device: {report['whole_model_memory_reduction_at_max_ratio']:.1%} less at the largest ratio")
    for name, c in report["checks"].items():
        v = c["value"]
        log(f"  {name}: {('%.3f' % v) if v is not None else '-'} (target {c['target']}): {'met' if c['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_bench(args)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if args.plot:
        _plot(report, args.plot)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
