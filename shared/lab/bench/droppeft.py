"""``splitllm bench droppeft``: DropPEFT against plain split LoRA (FedAvg) on heterogeneous devices, in two settings.

Settings: ``whole`` puts every block on the device (cut a = b = L: the paper's setting); ``split``
is the three-tier deployment (default cut 3,5: the device holds the shallowest blocks, which STLD
skips least). Both methods share the model, data, device slowdowns (users cycling 1x, 2x, 4x), links
and seeds; DropPEFT adds STLD with bandit-chosen ratios per device (reward: progress per second of
the round) and a personal last block (PTLS). The protocol is ``shared.lab.bench.protocol``'s: each
method's learning rate from the same grid at a tuning seed, then ``--seeds`` seeds, means with
standard errors, comparisons paired by seed.

Time runs on the simulator's virtual clock (``shared.protocol.clock``): a block's forward and
backward cost ``--block-ms`` on a 1x device and that times the slowdown on a slower one, edge and
cloud blocks cost ``--block-ms``, and each step message costs its emulated link time
(``--user-link``, ``--edge-link``). A round's time is its slowest device's; evaluation is not
counted. The bandit's reward reads the same clock. Wall seconds are reported beside it (they
depend on the machine's load).

* Time to target: the target is plain's eval loss at ``--target-fraction`` of the rounds, read off
  its smoothed curve (trailing mean of 3 rounds); each method's time is the virtual time of the
  first round where its own smoothed curve reaches it. The speedup is plain's over DropPEFT's, per seed.
* Memory: the bytes of the distinct tensors autograd saves in the device tier's forward, per
  training step, over the same batches, at each ratio, with the fixed-count mask and with
  independent draws; the per-step peak is the largest step. Every batch is padded to
  ``--max-len`` (the largest batch a device must hold), so a step's bytes depend on its mask only.
* The structural ceiling: the largest per-round speedup the straggler can get at the largest
  ratio, from the expected blocks run per tier (compute only, and with the run's link time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from shared.lab.bench.protocol import LR_GRID, TUNING_SEED, first_reach, fmt, mean_last, smooth, summary, tune_and_run
from shared.lab.bench.timing import save

SETTINGS = ("whole", "split")
METHODS = ("plain", "droppeft")
TARGETS = {"speedup": 1.3, "memory_reduction": 0.25, "accuracy_points": -1.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitllm bench droppeft", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny-bert, 3 users, 3 rounds, 1 seed, no grid")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of whole,split")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--data", default="trec")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--slowdowns", default="1,2,4", help="per-user compute slowdowns, cycled")
    p.add_argument("--split", default="3,5", help="the cut of the split setting (the device holds blocks [0, a))")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-steps", type=int, default=20, help="steps per round (the reward compares 5-step windows)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--block-ms", type=float, default=40.0,
                   help="virtual ms of one block's forward and backward on a 1x device (minilm, batch 16 x 29 tokens, "
                        "one core of the machine this was measured on)")
    p.add_argument("--user-link", default="wifi", help="link profile of the user-edge hops")
    p.add_argument("--edge-link", default="fiber", help="link profile of the edge-cloud hops")
    p.add_argument("--personal-layers", default="last", help="'last', '' (none) or comma-separated block indices")
    p.add_argument("--algorithm-config", default="{}", help="more droppeft options (JSON object)")
    p.add_argument("--target-fraction", type=float, default=0.8, help="target: plain's smoothed eval loss at this share of rounds")
    p.add_argument("--grid", default=",".join(str(x) for x in LR_GRID), help="learning rates each method is tuned over")
    p.add_argument("--lrs", default="", help="skip the grid for these methods: METHOD=LR,... (e.g. plain=5e-3)")
    p.add_argument("--tuning-seed", type=int, default=TUNING_SEED)
    p.add_argument("--seeds", type=int, default=3, help="reported seeds: --seed .. --seed + N - 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-steps", type=int, default=40, help="training batches the memory probe measures")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write the curves here (PNG)")
    args = p.parse_args(argv)
    if args.quick:
        args.__dict__.update(model="tiny-bert", users=3, edges=1, rounds=3, local_steps=4, batch_size=2, max_len=16,
                             max_examples=8, eval_examples=2, seeds=1, grid="5e-3", memory_steps=2, split="1,3")
    return args


# --- runs ------------------------------------------------------------------------------------------------------


def cut_of(setting: str, args: argparse.Namespace, num_layers: int) -> tuple[int, int]:
    if setting == "whole":
        return num_layers, num_layers
    a, b = (int(x) for x in args.split.split(","))
    return a, b


def droppeft_config(args: argparse.Namespace, num_layers: int) -> dict[str, Any]:
    personal = [num_layers - 1] if args.personal_layers == "last" else \
        [int(x) for x in args.personal_layers.split(",") if x]
    return {"personal_layers": personal, **json.loads(args.algorithm_config or "{}")}


def run_once(method: str, setting: str, lr: float, seed: int, args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """One simulation: per round, eval loss and accuracy, the round's virtual and wall time, DropPEFT's ratios."""
    from shared.config.round import RoundConfig
    from shared.lab.sim import SimConfig, Simulation
    from shared.model.sources import resolve_model

    num_layers = resolve_model(args.model).num_layers
    drop = method == "droppeft"
    cfg = SimConfig(model=args.model, data=args.data, users=args.users, edges=args.edges, rounds=args.rounds,
                    split=cut_of(setting, args, num_layers),
                    round=RoundConfig(local_steps=args.local_steps, batch_size=args.batch_size, lr=lr, deadline=None,
                                      algorithm="droppeft" if drop else "fedavg",
                                      config={"seed": seed, **droppeft_config(args, num_layers)} if drop else {}),
                    max_len=args.max_len, max_examples_per_client=args.max_examples or None,
                    eval_examples_per_client=args.eval_examples, seed=seed, user_link=args.user_link,
                    edge_link=args.edge_link, slowdowns=[float(x) for x in args.slowdowns.split(",") if x],
                    block_ms=args.block_ms, baseline_eval=False)
    sim = Simulation(cfg)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    cumulative = 0.0
    for _ in range(args.rounds):
        row = sim.run_round()
        users = sim.coordinator.rounds[row["round"]].metrics["users"]
        seconds = {u: float(m["seconds"]) for u, m in users.items()}
        cumulative += max(seconds.values())
        entry = {"round": row["round"], "eval_loss": row["eval_loss"], "eval_accuracy": row.get("eval_accuracy"),
                 "train_loss": row["train_loss"], "virtual_seconds": max(seconds.values()),
                 "cumulative_virtual_seconds": cumulative, "user_virtual_seconds": seconds,
                 "link_seconds": {u: sim.clock.account(row["round"], u)["link"] for u in users},
                 "wall_seconds": row["seconds"]}
        if drop:
            strategy = sim.coordinator.strategy_for(sim.request())
            entry["ratios"] = {h["user"]: h["ratio"] for h in strategy.history if h["round"] == row["round"]}
        rows.append(entry)
    out = {"method": method, "setting": setting, "split": list(cfg.split), "lr": lr, "seed": seed,
           "slowdowns": {u.user_id: u.slowdown for u in sim.users}, "rounds": rows,
           "mean_last3_accuracy": mean_last([r["eval_accuracy"] for r in rows]),
           "final_eval_loss": rows[-1]["eval_loss"], "virtual_seconds": cumulative,
           "wall_seconds": time.perf_counter() - started}
    if drop:
        strategy = sim.coordinator.strategy_for(sim.request())
        arms = [str(r) for r in strategy.config.ratios]
        out["bandit"] = {u: {"counts": dict(zip(arms, p.counts)), "best_ratio": strategy.config.ratios[p.best()]}
                         for u, p in sorted(strategy.policies.items())}
    log(f"    {setting:>5} {method:>8} lr {lr:g} seed {seed}: accuracy last 3 {out['mean_last3_accuracy']:.4f}, final "
        f"eval loss {out['final_eval_loss']:.4f}, {cumulative:.0f} virtual s, {out['wall_seconds']:.0f} wall s"
        + (f"; best ratios {[b['best_ratio'] for b in out['bandit'].values()]}" if drop else ""))
    return out


def time_to_target(run: dict[str, Any], target: float) -> dict[str, Any]:
    """The first round where the run's smoothed eval loss reaches ``target``, and its cumulative virtual time."""
    curve = smooth([r["eval_loss"] for r in run["rounds"]])
    i = first_reach(curve, target)
    return {"round": None if i is None else run["rounds"][i]["round"],
            "virtual_seconds": None if i is None else run["rounds"][i]["cumulative_virtual_seconds"],
            "wall_seconds": None if i is None else sum(r["wall_seconds"] for r in run["rounds"][: i + 1])}


def compare(plain: dict[str, Any], drop: dict[str, Any], fraction: float) -> dict[str, Any]:
    """One seed: the target from plain's smoothed curve, both methods' times to it, the speedup."""
    k = max(1, math.ceil(fraction * len(plain["rounds"]))) - 1
    target = smooth([r["eval_loss"] for r in plain["rounds"]])[k]
    times = {m: time_to_target(run, target) for m, run in (("plain", plain), ("droppeft", drop))}
    reached = times["droppeft"]["virtual_seconds"]
    return {"seed": plain["seed"], "target_eval_loss": target, "target_round": plain["rounds"][k]["round"],
            "to_target": times, "speedup": times["plain"]["virtual_seconds"] / reached if reached else None,
            "accuracy_delta_points": 100 * (drop["mean_last3_accuracy"] - plain["mean_last3_accuracy"])}


# --- memory: saved activations of the device tier's forward ---------------------------------------------


def device_activation_bytes(args: argparse.Namespace, split: tuple[int, int], ratios: list[float],
                            personal: list[int]) -> dict[str, Any]:
    """Per training step, the bytes of distinct tensors saved for backward in the device tier's forward."""
    from shared.config.deployment import DataSpec, ModelSpec
    from shared.data.batching import BatchSampler
    from shared.model.adapters import initial_state
    from shared.model.sources import resolve_model
    from shared.protocol.enums import Tier
    from shared.protocol.messages import RoundPlan
    from shared.runtime.tier import TierRuntime

    source = resolve_model(args.model)
    dataset = DataSpec(name=args.data, num_clients=1, seed=args.seed, max_len=args.max_len).load()
    spec = ModelSpec(model=args.model, split=split, task=dataset.task, num_labels=dataset.num_labels, seed=args.seed)
    runtime = TierRuntime(Tier.USER, source, spec)
    state = initial_state(runtime.slots.shapes(), args.seed)
    # every batch padded to --max-len: a step's bytes then depend on its mask alone (with rows padded to the
    # longest in the batch, the peak is whichever step drew the longest batch, and a mask that skips nothing
    # on a short batch hides under it)
    sampler = BatchSampler(source.tokenizer(), dataset.clients[0].train, dataset.task, args.max_len, pad_to_max=True)
    batches = list(sampler.round_batches(args.seed, 1, "user-0", args.memory_steps, args.batch_size))
    # the base weights (adapter slots hold whichever session was bound last: their addresses get reused)
    frozen = {p.untyped_storage().data_ptr() for p in runtime.partition.parameters() if not p.requires_grad}
    out: dict[str, Any] = {"split": list(split), "device_blocks": runtime.partition.layer_ids, "by_ratio": {}}
    for skip in ("fixed", "independent"):
        for ratio in ratios:
            plan = RoundPlan(round_id=1, user_id="user-0", local_steps=len(batches), batch_size=args.batch_size,
                             seed=args.seed, lr=1e-3, algorithm="droppeft",
                             config={"ratio": ratio, "personal_layers": personal, "skip": skip}, extra={"ratio": ratio})
            session = runtime.open_session(plan, state)
            trainable = {p.untyped_storage().data_ptr() for p in session.params.values()}
            per_step, blocks = [], []
            for step, batch in enumerate(batches):
                saved: list[weakref.ref[torch.Tensor]] = []

                def pack(t: torch.Tensor, saved: list[weakref.ref[torch.Tensor]] = saved) -> torch.Tensor:
                    saved.append(weakref.ref(t))
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    hidden = runtime.forward(session, None, batch.attention_mask, step, input_ids=batch.input_ids)
                alive = {}  # what the graph still holds once the forward is done (a freed node's tensors are gone)
                for ref in saved:
                    t = ref()
                    if t is not None and t.untyped_storage().data_ptr() not in frozen | trainable:
                        alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                per_step.append(sum(alive.values()))
                blocks.append(len(session.plugin.layers_to_run(step)))
                runtime.backward_and_step(session, [hidden], [torch.ones_like(hidden) * 1e-3])
            runtime.close_session(1, "user-0")
            out["by_ratio"].setdefault(skip, {})[str(ratio)] = {
                "mean_bytes": sum(per_step) / len(per_step), "peak_bytes": max(per_step),
                "mean_blocks_run": sum(blocks) / len(blocks), "min_blocks_run": min(blocks), "max_blocks_run": max(blocks)}
    return out


def ceiling(split: tuple[int, int], num_layers: int, slowdown: float, ratio: float, cap: float, personal: list[int],
            block_s: float, link_s: float) -> dict[str, float]:
    """The straggler's largest per-round speedup at ``ratio``: expected blocks run per tier (compute, then with links)."""
    from shared.fl.droppeft import layer_ratios

    probs = layer_ratios(ratio, num_layers, cap, personal)
    plain = sum(slowdown if l < split[0] else 1.0 for l in range(num_layers)) * block_s
    drop = sum((1 - p) * (slowdown if l < split[0] else 1.0) for l, p in enumerate(probs)) * block_s
    return {"compute_only": plain / drop, "with_links": (plain + link_s) / (drop + link_s)}


# --- the bench ----------------------------------------------------------------------------------------------


def run_setting(setting: str, args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    from shared.fl.droppeft import DropPEFTConfig
    from shared.model.sources import resolve_model

    num_layers = resolve_model(args.model).num_layers
    out: dict[str, Any] = {"split": list(cut_of(setting, args, num_layers)), "methods": {}}
    for method in METHODS:
        lr, tried, runs = tune_and_run(method, lambda lr, seed, m=method: run_once(m, setting, lr, seed, args, log), args)
        out["methods"][method] = {
            "lr": lr, "grid": [{"lr": t["lr"], "mean_last3_accuracy": t["quality"]} for t in tried],
            "mean_last3_accuracy": summary([r["mean_last3_accuracy"] for r in runs]),
            "final_eval_loss": summary([r["final_eval_loss"] for r in runs]),
            "virtual_seconds": summary([r["virtual_seconds"] for r in runs]),
            "wall_seconds": summary([r["wall_seconds"] for r in runs]), "runs": runs}
    pairs = [compare(p, d, args.target_fraction) for p, d in zip(*(out["methods"][m]["runs"] for m in METHODS))]
    speedups = [c["speedup"] for c in pairs if c["speedup"] is not None]
    out["per_seed"] = pairs
    out["speedup"] = summary(speedups) if speedups else None
    out["seeds_reaching_target"] = len(speedups)
    out["accuracy_delta_points"] = summary([c["accuracy_delta_points"] for c in pairs])
    config = DropPEFTConfig.from_dict(droppeft_config(args, num_layers))
    split = tuple(out["split"])
    out["memory"] = device_activation_bytes(args, split, sorted({0.0, *config.ratios}), config.personal_layers)
    plain_mem = out["memory"]["by_ratio"]["fixed"]["0.0"]["peak_bytes"]
    out["peak_reduction"] = {skip: {r: 1 - v["peak_bytes"] / plain_mem for r, v in by.items()}
                             for skip, by in out["memory"]["by_ratio"].items()}
    slowest = max(float(x) for x in args.slowdowns.split(",") if x)
    plain_runs = out["methods"]["plain"]["runs"]
    link = [s for run in plain_runs for r in run["rounds"] for u, s in r["link_seconds"].items()
            if run["slowdowns"][u] == slowest]
    out["ceiling"] = ceiling(split, num_layers, slowest, max(config.ratios), config.max_layer_ratio,
                             config.personal_layers, args.block_ms / 1000 * args.local_steps,
                             sum(link) / max(len(link), 1))
    return out


def _plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(report["settings"])
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.2 * len(settings)), squeeze=False)
    for (loss_ax, mem_ax), setting in zip(axes, settings):
        entry = report["settings"][setting]
        for method, m in entry["methods"].items():
            for i, run in enumerate(m["runs"]):
                xs = [r["cumulative_virtual_seconds"] for r in run["rounds"]]
                loss_ax.plot(xs, smooth([r["eval_loss"] for r in run["rounds"]]), color="C0" if method == "plain" else "C1",
                             alpha=0.8, label=f"{method} (lr {m['lr']:g})" if i == 0 else None)
        for c in entry["per_seed"]:
            loss_ax.axhline(c["target_eval_loss"], color="grey", ls="--", lw=0.8)
        loss_ax.set(xlabel="virtual seconds (slowest device per round)", ylabel="eval loss (trailing mean of 3 rounds)",
                    title=f"{setting}: cut {entry['split']}; targets dashed")
        by = entry["memory"]["by_ratio"]
        for skip, marker in (("fixed", "o-"), ("independent", "s--")):
            ratios = sorted(by[skip], key=float)
            mem_ax.plot([float(r) for r in ratios], [by[skip][r]["peak_bytes"] / 1e6 for r in ratios], marker,
                        label=f"{skip}: per-step peak")
            mem_ax.plot([float(r) for r in ratios], [by[skip][r]["mean_bytes"] / 1e6 for r in ratios], marker,
                        alpha=0.4, label=f"{skip}: mean")
        mem_ax.set(xlabel="STLD ratio", ylabel="device MB saved for backward per step", title="device activation memory")
        for ax in (loss_ax, mem_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict[str, Any], log: Any = print) -> None:
    for setting, e in report["settings"].items():
        log(f"\n{setting} (cut {e['split']}): target = plain's smoothed eval loss at {report['config']['target_fraction']:.0%}"
            f" of the rounds")
        log(f"  {'method':>8}  {'lr':>7}  {'last-3 accuracy':>15}  {'final eval loss':>15}  {'virtual s':>14}  {'wall s':>12}")
        for method, m in e["methods"].items():
            log(f"  {method:>8}  {m['lr']:>7g}  {fmt(m['mean_last3_accuracy']):>15}  {fmt(m['final_eval_loss']):>15}  "
                f"{fmt(m['virtual_seconds'], 0):>14}  {fmt(m['wall_seconds'], 0):>12}")
        speed = fmt(e["speedup"], 2) if e["speedup"] else "not reached"
        log(f"  speedup to target (virtual clock): {speed} ({e['seeds_reaching_target']} of {len(e['per_seed'])} seeds "
            f"reached it); accuracy DropPEFT - plain {fmt(e['accuracy_delta_points'], 2)} points")
        for skip, by in e["memory"]["by_ratio"].items():
            log(f"  device per-step peak MB, {skip:>11}: " + ", ".join(
                f"{r}: {v['peak_bytes'] / 1e6:.2f} ({v['min_blocks_run']}-{v['max_blocks_run']} blocks)" for r, v in by.items()))
        log(f"  structural ceiling at the largest ratio on the slowest device: {e['ceiling']['compute_only']:.2f}x compute "
            f"only, {e['ceiling']['with_links']:.2f}x with its link time")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    if set(settings) - set(SETTINGS):
        raise SystemExit(f"unknown settings {sorted(set(settings) - set(SETTINGS))}: choose from {', '.join(SETTINGS)}")
    started = time.perf_counter()
    report: dict[str, Any] = {"config": vars(args), "targets": TARGETS, "settings": {},
                              "time_model": "virtual clock: blocks run x block ms x the device's slowdown (edge and "
                                            "cloud at 1x) + emulated link time of step messages; a round is its "
                                            "slowest device's; evaluation excluded"}
    for setting in settings:
        print(f"{setting}: {args.model} on {args.data}, {args.users} users ({args.slowdowns}x), {args.rounds} rounds",
              flush=True)
        report["settings"][setting] = run_setting(setting, args)
    report["bench_seconds"] = time.perf_counter() - started
    print_table(report)
    print(f"bench: {report['bench_seconds'] / 60:.1f} min")
    save(report, args.json, args.plot, _plot)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
