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
from shared.lab.cluster import Cluster
from shared.lab.sim import SimConfig, Simulation


def _step_times(record_metrics: dict[str, Any]) -> list[float]:
    return list(next(iter(record_metrics["users"].values()))["step_seconds"])


def _compute_per_step(record_metrics: dict[str, Any], steps: int) -> dict[str, float]:
    """Each tier's compute seconds per step (its forwards, backwards and updates, timed inside the tier)."""
    return {tier: seconds / steps for tier, seconds in record_metrics["compute_seconds"].items()}


def bench_http(model: str = "smollm2-135m", split: str = "2,15", batch_size: int = 8, seq_len: int = 128,
               steps: int = 8, seed: int = 0) -> dict[str, Any]:
    """One user through one edge: median per-step time over HTTP on loopback and in one process.

    Same model, data, batches and seed on both paths; the first step of each is a warm-up and is
    left out of the median. Rows are full length (consecutive speeches joined, then truncated).
    Beside the wall time, each path's CPU seconds over its round (this process's for the in-process
    path; the cloud's, the edge's and the user's together over HTTP): the work HTTP adds, which depends
    far less than wall time on what else runs on the machine. And where a step's time goes on each path: each
    tier's compute seconds per step (the round's over its steps), and the rest of the mean step outside them:
    links, codecs, hand-offs between threads and processes (the first step included in both). Both paths run
    under this process's OpenMP wait policy (``splitllm`` sets PASSIVE with a short spin, as the services do:
    ``shared.config.threads``), recorded as ``omp_wait_policy`` and ``gomp_spincount``; under different
    policies the comparison would measure them, not HTTP. ``harness_cpu_seconds``: what this process itself took
    over the HTTP round (starting it and polling its state), on the cores the three processes compute on; the
    in-process path has no such cost.
    """
    a, b = (int(x) for x in split.split(","))
    common = {"model": model, "data": "shakespeare", "seed": seed, "max_len": seq_len, "min_chars": 8 * seq_len,
              "max_examples_per_client": 4 * batch_size * steps}
    sim = Simulation(SimConfig(users=1, edges=1, rounds=1, split=(a, b), baseline_eval=False, **common,
                               round=RoundConfig(local_steps=steps, batch_size=batch_size, deadline=None, evaluate=False)))
    with Machine() as machine_in:
        cpu0, counters0 = time.process_time(), {"self": process_counters()}
        record = sim.run_record()
        cpu_in, counters_in = time.process_time() - cpu0, counters_since(counters0)
    inproc, compute_in = _step_times(record.metrics), _compute_per_step(record.metrics, steps)
    shape = next(iter(record.metrics["users"].values()))["batch_shape"]
    del sim
    with tempfile.TemporaryDirectory() as tmp:
        cloud_args = ["--model", model, "--split", split, "--data", "shakespeare", "--seed", str(seed),
                      "--max-len", str(seq_len), "--min-chars", str(8 * seq_len),
                      "--max-examples-per-client", str(4 * batch_size * steps)]
        cluster = Cluster(Path(tmp), cloud_args, users=1, edges=1)
        try:
            cluster.start()
            timed = timed_round(cluster, {"local_steps": steps, "batch_size": batch_size, "evaluate": False})
        finally:
            cluster.stop()
    view, cpu_http, counters_http = timed["view"], sum(timed["cpu_seconds"].values()), timed["counters"]
    http, compute_http = _step_times(view["metrics"]), _compute_per_step(view["metrics"], steps)
    med_in, med_http = statistics.median(inproc[1:]), statistics.median(http[1:])
    mean_in, mean_http = statistics.mean(inproc), statistics.mean(http)
    return {"model": model, "split": split, "batch_shape": shape, "steps": steps,
            "inprocess_step_seconds": med_in, "http_step_seconds": med_http, "ratio": med_http / med_in,
            "target_ratio": 1.05, "inprocess_steps": inproc, "http_steps": http,
            "compute_per_step": {"inprocess": compute_in, "http": compute_http},
            "outside_compute_per_step": {"inprocess": mean_in - sum(compute_in.values()),
                                         "http": mean_http - sum(compute_http.values())},
            "inprocess_round_cpu_seconds": cpu_in, "http_round_cpu_seconds": cpu_http, "cpu_ratio": cpu_http / cpu_in,
            "round_counters": {"inprocess": counters_in, "http": counters_http,
                               "http_by_process": timed["counters_by_process"]},
            "harness_cpu_seconds": timed["harness_cpu_seconds"],  # this process's, over the HTTP round
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "machine": {"inprocess": machine_in.record, "http": timed["machine"]}}


def summary(report: dict[str, Any]) -> str:
    """``bench_http``'s figures in one paragraph."""
    outside = report["outside_compute_per_step"]
    return (f"{report['model']} batch {report['batch_shape']}: in-process {report['inprocess_step_seconds']:.3f} s/step, "
            f"HTTP on loopback {report['http_step_seconds']:.3f} s/step, ratio {report['ratio']:.3f} (target <= 1.05); "
            f"CPU seconds of the round: in-process {report['inprocess_round_cpu_seconds']:.1f}, HTTP "
            f"{report['http_round_cpu_seconds']:.1f} (all three processes), ratio {report['cpu_ratio']:.3f}; outside the "
            f"tiers' compute per step: in-process {outside['inprocess']:.3f} s, HTTP {outside['http']:.3f} s; "
            f"this process's CPU over the HTTP round {report['harness_cpu_seconds']:.2f} s; "
            f"load {report['machine']['http']['load_before']}" + _reported(report["machine"]))


def _reported(machine: dict[str, Any]) -> str:
    """Free memory the kernel handed back to a hypervisor on each path, where it does (``Machine``)."""
    mb = [machine[k].get("reported_to_host_mb") for k in ("inprocess", "http")]
    return "" if None in mb else f"; free memory reported to the host: in-process {mb[0]:.0f} MB, HTTP {mb[1]:.0f} MB"
