"""Benchmarks that write JSON: the HTTP path's per-step time against the in-process path."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.config.round import RoundConfig
from shared.lab.bench.timing import Machine, counters_since, process_counters, timed_round
from shared.lab.cluster import Cluster, full_row_args
from shared.lab.sim import SimConfig, Simulation

PATHS = {"I": "inprocess", "H": "http"}


def _step_times(record_metrics: dict[str, Any]) -> list[float]:
    return list(next(iter(record_metrics["users"].values()))["step_seconds"])


def _compute_per_step(record_metrics: dict[str, Any], steps: int) -> dict[str, float]:
    """Each tier's compute seconds per step (its forwards, backwards and updates, timed inside the tier)."""
    return {tier: seconds / steps for tier, seconds in record_metrics["compute_seconds"].items()}


def _inprocess_round(common: dict[str, Any], split: tuple[int, int], steps: int, batch_size: int) -> dict[str, Any]:
    """One round of a fresh in-process simulation: its steps, compute, CPU seconds and counters."""
    sim = Simulation(SimConfig(users=1, edges=1, rounds=1, split=split, baseline_eval=False, **common,
                               round=RoundConfig(local_steps=steps, batch_size=batch_size, deadline=None, evaluate=False)))
    with Machine() as machine:
        cpu0, counters0 = time.process_time(), {"self": process_counters()}
        record = sim.run_record()
        cpu, counters = time.process_time() - cpu0, counters_since(counters0)
    return {"path": "inprocess", "steps": _step_times(record.metrics),
            "compute_per_step": _compute_per_step(record.metrics, steps), "cpu_seconds": cpu, "counters": counters,
            "machine": machine.record, "batch_shape": next(iter(record.metrics["users"].values()))["batch_shape"]}


def _http_round(cloud_args: list[str], steps: int, batch_size: int) -> dict[str, Any]:
    """One round of a fresh cluster (a cloud, an edge and a user, each its own process, on loopback)."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), cloud_args, users=1, edges=1)
        try:
            cluster.start()
            timed = timed_round(cluster, {"local_steps": steps, "batch_size": batch_size, "evaluate": False})
        finally:
            cluster.stop()
    metrics = timed["view"]["metrics"]
    return {"path": "http", "steps": _step_times(metrics), "compute_per_step": _compute_per_step(metrics, steps),
            "cpu_seconds": sum(timed["cpu_seconds"].values()), "counters": timed["counters"],
            "counters_by_process": timed["counters_by_process"], "machine": timed["machine"],
            "harness_cpu_seconds": timed["harness_cpu_seconds"]}


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.mean(d[key] for d in dicts) for key in dicts[0]}


def bench_http(model: str = "smollm2-135m", split: str = "2,15", batch_size: int = 8, seq_len: int = 128,
               steps: int = 8, seed: int = 0, order: str = "IHHI") -> dict[str, Any]:
    """One user through one edge: median per-step time over HTTP on loopback and in one process.

    Same model, data, batches and seed on both paths; each round starts fresh (a new simulation, or a new cluster
    of three processes), and the rounds run in ``order`` (``I``: in-process, ``H``: HTTP). The default, IHHI, puts
    both paths equally early and late, so that a machine whose speed drifts steadily over the bench slows both
    alike; "IH" is one round each, in-process first. The first step of each round is a warm-up and is left out;
    a path's figure is the median of its other steps over all its rounds, and each round's own median is kept
    (``rounds``). Rows are full length (consecutive speeches joined, then truncated).
    Beside the wall time, each path's CPU seconds per round (this process's for the in-process path; the
    cloud's, the edge's and the user's together over HTTP): the work HTTP adds, which depends far less than wall
    time on what else runs on the machine. And where a step's time goes on each path: each tier's compute seconds
    per step (the round's over its steps), and the rest of the mean step outside them: links, codecs, hand-offs
    between threads and processes (the first step included in both). Counters and CPU seconds are a path's mean
    per round. Both paths run under this process's OpenMP wait policy (``splitllm`` sets PASSIVE with a short
    spin, as the services do: ``shared.config.threads``), recorded as ``omp_wait_policy`` and
    ``gomp_spincount``; under different policies the comparison would measure them, not HTTP.
    ``harness_cpu_seconds``: what this process itself took over an HTTP round (starting it and polling its
    state), on the cores the three processes compute on; the in-process path has no such cost. ``machine``: the
    load around each path's first round; ``machine_by_round``: around every round.
    """
    if not order or set(order) - set(PATHS) or len(set(order)) < 2:
        raise ValueError(f"order {order!r}: a string of I (in-process) and H (HTTP) with at least one of each")
    a, b = (int(x) for x in split.split(","))
    common = {"model": model, "data": "shakespeare", "seed": seed, "max_len": seq_len, "min_chars": 8 * seq_len,
              "max_examples_per_client": 4 * batch_size * steps}
    cloud_args = full_row_args(model, split, "shakespeare", seq_len, 4 * batch_size * steps, seed)
    rounds = [_inprocess_round(common, (a, b), steps, batch_size) if p == "I"
              else _http_round(cloud_args, steps, batch_size) for p in order]
    by = {path: [r for r in rounds if r["path"] == path] for path in PATHS.values()}
    median = {path: statistics.median(s for r in rs for s in r["steps"][1:]) for path, rs in by.items()}
    compute = {path: _mean_dicts([r["compute_per_step"] for r in rs]) for path, rs in by.items()}
    outside = {path: statistics.mean(s for r in rs for s in r["steps"]) - sum(compute[path].values())
               for path, rs in by.items()}
    cpu = {path: statistics.mean(r["cpu_seconds"] for r in rs) for path, rs in by.items()}
    return {"model": model, "split": split, "batch_shape": by["inprocess"][0]["batch_shape"], "steps": steps,
            "order": order, "inprocess_step_seconds": median["inprocess"], "http_step_seconds": median["http"],
            "ratio": median["http"] / median["inprocess"], "target_ratio": 1.05,
            "inprocess_steps": [r["steps"] for r in by["inprocess"]], "http_steps": [r["steps"] for r in by["http"]],
            "rounds": [{"path": r["path"], "median_step_seconds": statistics.median(r["steps"][1:]),
                        "cpu_seconds": r["cpu_seconds"]} for r in rounds],
            "compute_per_step": compute, "outside_compute_per_step": outside,
            "inprocess_round_cpu_seconds": cpu["inprocess"], "http_round_cpu_seconds": cpu["http"],
            "cpu_ratio": cpu["http"] / cpu["inprocess"],
            "round_counters": {**{path: _mean_dicts([r["counters"] for r in rs]) for path, rs in by.items()},
                               "http_by_process": {name: _mean_dicts([r["counters_by_process"][name] for r in by["http"]])
                                                   for name in by["http"][0]["counters_by_process"]}},
            "harness_cpu_seconds": statistics.mean(r["harness_cpu_seconds"] for r in by["http"]),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "machine": {"inprocess": by["inprocess"][0]["machine"], "http": by["http"][0]["machine"]},
            "machine_by_round": [r["machine"] for r in rounds]}


def summary(report: dict[str, Any]) -> str:
    """``bench_http``'s figures in one paragraph."""
    outside = report["outside_compute_per_step"]
    return (f"{report['model']} batch {report['batch_shape']}: in-process {report['inprocess_step_seconds']:.3f} s/step, "
            f"HTTP on loopback {report['http_step_seconds']:.3f} s/step, ratio {report['ratio']:.3f} (target <= 1.05); "
            f"CPU seconds of the round: in-process {report['inprocess_round_cpu_seconds']:.1f}, HTTP "
            f"{report['http_round_cpu_seconds']:.1f} (all three processes), ratio {report['cpu_ratio']:.3f}; outside the "
            f"tiers' compute per step: in-process {outside['inprocess']:.3f} s, HTTP {outside['http']:.3f} s; "
            f"this process's CPU over an HTTP round {report['harness_cpu_seconds']:.2f} s; each round's median s/step, "
            f"in turn: " + ", ".join(f"{r['path']} {r['median_step_seconds']:.3f}" for r in report["rounds"]) + "; "
            f"load {report['machine']['http']['load_before']}" + _reported(report["machine"]))


def _reported(machine: dict[str, Any]) -> str:
    """Free memory the kernel handed back to a hypervisor on each path, where it does (``Machine``)."""
    mb = [machine[k].get("reported_to_host_mb") for k in ("inprocess", "http")]
    return "" if None in mb else f"; free memory reported to the host: in-process {mb[0]:.0f} MB, HTTP {mb[1]:.0f} MB"
