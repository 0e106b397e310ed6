"""Benchmarks that write JSON: the HTTP path's per-step time against the in-process path."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from shared.lab.cluster import one_round
from shared.lab.sim import SimConfig, Simulation
from shared.config.round import RoundConfig


def _step_times(record_metrics: dict[str, Any]) -> list[float]:
    return list(next(iter(record_metrics["users"].values()))["step_seconds"])


def bench_http(model: str = "smollm2-135m", split: str = "2,15", batch_size: int = 8, seq_len: int = 128,
               steps: int = 8, seed: int = 0) -> dict[str, Any]:
    """One user through one edge: median per-step time over HTTP on loopback and in one process.

    Same model, data, batches and seed on both paths; the first step of each is a warm-up and is
    left out of the median. Rows are full length (consecutive speeches joined, then truncated).
    """
    a, b = (int(x) for x in split.split(","))
    common = dict(model=model, data="shakespeare", seed=seed, max_len=seq_len, min_chars=8 * seq_len,
                  max_examples_per_client=4 * batch_size * steps)
    sim = Simulation(SimConfig(users=1, edges=1, rounds=1, split=(a, b), baseline_eval=False, **common,
                               round=RoundConfig(local_steps=steps, batch_size=batch_size, deadline=None, evaluate=False)))
    record = sim.run_record()
    inproc = _step_times(record.metrics)
    shape = next(iter(record.metrics["users"].values()))["batch_shape"]
    del sim
    with tempfile.TemporaryDirectory() as tmp:
        cloud_args = ["--model", model, "--split", split, "--data", "shakespeare", "--seed", str(seed),
                      "--max-len", str(seq_len), "--min-chars", str(8 * seq_len),
                      "--max-examples-per-client", str(4 * batch_size * steps)]
        view = one_round(Path(tmp), cloud_args, {"local_steps": steps, "batch_size": batch_size, "evaluate": False},
                         users=1, edges=1)
    http = _step_times(view["metrics"])
    med_in, med_http = statistics.median(inproc[1:]), statistics.median(http[1:])
    return {"model": model, "split": split, "batch_shape": shape, "steps": steps,
            "inprocess_step_seconds": med_in, "http_step_seconds": med_http, "ratio": med_http / med_in,
            "target_ratio": 1.10, "inprocess_steps": inproc, "http_steps": http}
