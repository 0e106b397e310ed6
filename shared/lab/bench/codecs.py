"""Benchmarks that write JSON: codecs' bytes, speed and effect on the loss; a round over emulated 4g links."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.lab.bench.busy import idle_by_part
from shared.lab.bench.protocol import mean_se
from shared.lab.bench.timing import timed_round
from shared.lab.cluster import Cluster, full_row_args
from shared.lab.sim import SimConfig, Simulation
from shared.config.round import RoundConfig


BENCH_CODECS = ("fp32", "fp16", "bf16", "int8", "int8+shuffle-lz4", "int8:channels=none", "int4", "int4+shuffle-lz4",
                "activations=int8,gradients=topk:ratio=0.1")


def _codec_run(spec: str, model: str, split: tuple[int, int], steps: int, batch_size: int, seq_len: int,
               seed: int, data: str, eval_examples: int) -> dict[str, Any]:
    """One user through one edge for ``steps`` steps with ``spec`` on both hops, from the same seed.

    Bytes are the training step messages on the user-edge hop (activation up, gradient down), as
    encoded on the wire; the loss is the held-out loss after the steps. Language-model rows are full
    length (consecutive speeches joined, then truncated), so every step carries batch x seq_len tokens.
    """
    min_chars = 8 * seq_len if data == "shakespeare" else 0
    sim = Simulation(SimConfig(model=model, data=data, users=1, edges=1, rounds=1, split=split,
                               round=RoundConfig(local_steps=steps, batch_size=batch_size, deadline=None, evaluate=False),
                               max_len=seq_len, seed=seed, min_chars=min_chars,
                               max_examples_per_client=2 * steps * batch_size, eval_examples_per_client=eval_examples,
                               user_edge_codecs=spec, edge_cloud_codecs=spec, baseline_eval=False))
    sim.run_round()
    up, down, count = sim.user_links[0].stats.snapshot()["by_endpoint"]["step"]
    losses = next(iter(sim.coordinator.rounds.values())).metrics["users"]["user-0"]["losses"]
    held_out = sim.evaluate_only()
    return {"bytes_per_step": (up + down) / count, "final_train_loss": sum(losses[-5:]) / 5,
            "eval_loss": held_out["eval_loss"], "eval_accuracy": held_out.get("eval_accuracy")}


def bench_codecs(model: str = "minilm-l6", split: str = "1,3", steps: int = 50, batch_size: int = 16,
                 seq_len: int = 128, seeds: tuple[int, ...] = (0, 1, 2),
                 codecs: tuple[str, ...] = BENCH_CODECS, data: str | None = None,
                 eval_examples: int = 128, threads: int = 1) -> dict[str, Any]:
    """Bytes per step, ratio against fp32, encode+decode throughput, and the loss after ``steps`` steps.

    The throughput is measured with torch on ``threads`` threads, as the tiers of the 4g round run (0: torch's
    default): the codecs make one torch call per pass where torch runs one thread, and work in chunks that stay
    on the calling thread otherwise (``shared.protocol.codecs.arrays``).

    The loss effect is the held-out loss after the steps against the first codec's (fp32) from the
    same seed, as a mean over ``seeds`` with its standard error: training moves a seed's loss by
    several per cent under any perturbation of the activations (bf16 included), so a single seed
    says little and the spread is part of the result.
    """
    import torch

    from shared.protocol.measure import measure, memory_passes
    from shared.config.deployment import parse_hop_codecs
    from shared.model.sources import resolve_model

    a, b = (int(x) for x in split.split(","))
    source = resolve_model(model)
    data = data or ("shakespeare" if "lm" in source.family.tasks else "trec")  # encoder: classification
    runs: dict[str, list[dict[str, Any]]] = {}
    for spec in codecs:
        for seed in seeds:
            t0 = time.perf_counter()
            runs.setdefault(spec, []).append(
                _codec_run(spec, model, (a, b), steps, batch_size, seq_len, seed, data, eval_examples))
            print(f"  {spec} seed {seed}: held-out loss {runs[spec][-1]['eval_loss']:.4f}, "
                  f"train loss (last 5 steps) {runs[spec][-1]['final_train_loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    base = runs[codecs[0]]
    hidden = int(source.config.hidden_size)
    act = torch.randn(batch_size, seq_len, hidden, generator=torch.Generator().manual_seed(0)) * 2
    prior = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        speeds = {spec: measure((parse_hop_codecs(spec) or {"activations": "fp32"})["activations"], act)
                  for spec in codecs}
        passes = memory_passes(act)
    finally:
        torch.set_num_threads(prior)
    results = []
    for spec in codecs:
        throughput = speeds[spec]
        deltas = [100.0 * (r["eval_loss"] - b0["eval_loss"]) / b0["eval_loss"] for r, b0 in zip(runs[spec], base)]
        delta, delta_se = mean_se(deltas)
        per_step = statistics.mean(r["bytes_per_step"] for r in runs[spec])
        accuracies = [r["eval_accuracy"] for r in runs[spec] if r["eval_accuracy"] is not None]
        results.append({
            "codec": spec, "bytes_per_step": per_step,
            "ratio_vs_fp32": statistics.mean(r["bytes_per_step"] for r in base) / per_step,
            "encode_decode_mb_s": throughput["encode_decode_mb_s"],
            "encode_decode_mb_s_median": throughput["encode_decode_mb_s_median"],
            "encode_decode_cpu_mb_s": throughput["encode_decode_cpu_mb_s"],
            "loss_after_steps": statistics.mean(r["eval_loss"] for r in runs[spec]),
            "loss_delta_pct": delta, "loss_delta_pct_se": delta_se, "loss_delta_pct_per_seed": deltas,
            "eval_loss_per_seed": [r["eval_loss"] for r in runs[spec]],
            "train_loss_per_seed": [r["final_train_loss"] for r in runs[spec]],
            "train_loss_delta_pct": statistics.mean(
                100.0 * (r["final_train_loss"] - b0["final_train_loss"]) / b0["final_train_loss"]
                for r, b0 in zip(runs[spec], base)),
            "eval_accuracy": statistics.mean(accuracies) if accuracies else None,
            "activation_rel_err": throughput["rel_err"],
        })
    return {"model": model, "split": split, "data": data, "steps": steps, "batch": [batch_size, seq_len],
            "seeds": list(seeds), "eval_examples": eval_examples, "passes": passes,
            "speed_threads": threads or prior, "int_codecs": int_codecs_path(),
            "loss": f"held-out loss after the steps ({eval_examples} examples), mean over seeds; "
                    "loss_delta_pct_se is the standard error of the mean change",
            "bytes": "user-edge hop, both ways, per training step", "codecs": results}


def int_codecs_path() -> str:
    """Which path the int8 and int4 codecs took: their compiled loop, or numpy's and torch's passes (no compiler)."""
    from shared.protocol.codecs import blockwise

    return "compiled loop" if blockwise.kernel is not None else "numpy and torch passes"


def passes_line(p: dict[str, Any]) -> str:
    """``memory_passes``' figures as the line ``bench codecs`` prints."""
    return (f"one pass over the {p['bytes'] / 1e6:.1f} MB tensor (the floor under each codec's chain of them): "
            f"copy {p['copy_whole_gb_s']:.1f} GB/s, multiply {p['multiply_whole_gb_s']:.1f} GB/s; over "
            f"{p['cached_bytes'] // 1024} kB in cache: copy {p['copy_cached_gb_s']:.1f}, multiply "
            f"{p['multiply_cached_gb_s']:.1f} GB/s")


def bench_codecs_4g(model: str = "minilm-l6", split: str = "1,3", users: int = 4, steps: int = 5,
                    batch_size: int = 16, seq_len: int = 128, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Round wall time of ``users`` users through one edge over emulated 4g links: fp32 against int8.

    Real processes on loopback; each user's link to the edge really waits its 4g transfer time. Rows
    are full length (questions of one class joined, then truncated to ``seq_len``): padding does not
    travel (only real tokens cross a cut), so short rows would hide what the codec saves.
    ``threads`` > 0 sets every tier's torch threads; the default 1 keeps the ``users`` + 2 processes, which
    stand for as many machines, from oversubscribing this machine's cores; 0 leaves torch's default, one
    per core in each process. Each codec's run records the CPU seconds every process used in its round
    (``cpu_seconds``; user and system seconds and minor page faults apart in ``counters_by_process``): with idle
    OpenMP threads spinning (``OMP_WAIT_POLICY=ACTIVE``) and two threads a process, the waiting users spend many
    times their work spinning (``docs/performance-log.md``). And where its cores sat idle: all processes' CPU seconds
    every 0.2 s (``busy``) and the core-seconds left idle in each tenth of the timed part, from starting the round to
    seeing it done (``idle_core_seconds_by_tenth``). The tiers inherit
    this process's environment: ``SPLITLLM_AUTOCAST=bf16`` runs every tier's matmuls in bfloat16 (``autocast``
    in the JSON).
    """
    import os

    env = {**os.environ, "SPLITLLM_THREADS": str(threads)}
    out = {}
    for spec in ("fp32", "int8", "int8+shuffle-lz4"):
        with tempfile.TemporaryDirectory() as tmp:
            cloud_args = [*full_row_args(model, split, "trec", seq_len, 16 * steps * batch_size, seed),
                          "--user-edge-codecs", spec]
            cluster = Cluster(Path(tmp), cloud_args, users=users, edges=1, user_args=["--link-profile", "4g"], env=env)
            try:
                cluster.start()
                timed = timed_round(cluster, {"local_steps": steps, "batch_size": batch_size, "evaluate": False},
                                    sample_s=0.2)
            finally:
                cluster.stop()
        view, cpu = timed["view"], timed["cpu_seconds"]
        out[spec] = {"round_seconds": view["metrics"]["seconds"], "bytes": view["metrics"]["bytes"],
                     "cpu_seconds": cpu, "cpu_seconds_total": sum(cpu.values()), "machine": timed["machine"],
                     "counters_by_process": timed["counters_by_process"], "busy": timed["busy"],
                     "idle_core_seconds_by_tenth": idle_by_part(timed["busy"], timed["machine"]["cpus"])}
    return {"profile": "4g", "users": users, "steps": steps, "batch": [batch_size, seq_len], "threads": threads,
            "autocast": os.environ.get("SPLITLLM_AUTOCAST", "off"), "runs": out,
            "speedup_int8": out["fp32"]["round_seconds"] / out["int8"]["round_seconds"],
            "speedup_int8_shuffle_lz4": out["fp32"]["round_seconds"] / out["int8+shuffle-lz4"]["round_seconds"]}
