"""``splitllm bench compare`` at a tiny size: every method from the same data, what each one's device sends, and
(slow) the timed rounds through real processes. Its timings are figures for the README, never asserted here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shared.lab.bench.compare import METHODS, main

TINY = ["--model", "tiny-bert", "--users", "2", "--edges", "1", "--rounds", "1", "--local-steps", "2",
        "--batch-size", "4", "--seq-len", "16", "--max-examples", "16", "--eval-examples", "8"]


def test_bench_compare_runs_every_method_on_the_same_data(tiny, tmp_path: Path) -> None:
    tiny("tiny-bert")
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    assert main([*TINY, "--profiles", "", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    rows = report["methods"]
    assert list(rows) == list(METHODS) and png.stat().st_size > 0
    layers = report["num_layers"]
    central = rows["centralised"]
    assert central["users"] == 1 and central["local_steps"] == 2 * 2  # as many samples a round as the federation
    assert central["bytes_per_device_per_round"] is None  # no device: the trainer holds the pooled data
    for kind in ("federated", "split"):
        fp32, int8 = rows[f"{kind}-fp32"], rows[f"{kind}-int8"]
        assert int8["bytes_per_device_per_round"] < fp32["bytes_per_device_per_round"]
        assert fp32["codecs"] == "fp32" and "uploads=int8" in int8["codecs"]
    assert rows["federated-fp32"]["split"] == [layers, layers] and rows["split-fp32"]["split"] == [1, 3]
    # a federated device sends its adapters only; a split device also each step's activations and gradients
    assert rows["federated-fp32"]["bytes_per_device_per_round"] < rows["split-fp32"]["bytes_per_device_per_round"]
    for row in rows.values():
        assert row["eval_loss"] > 0 and row["device_peak_rss_bytes"] > 0 and row["device_compute_s_per_step"] > 0
        assert row["rounds_timed"] == {}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_bench_compare_times_a_round_per_profile_with_real_processes(tiny, tmp_path: Path) -> None:
    tiny("tiny-bert")
    out = tmp_path / "compare.json"
    assert main([*TINY, "--methods", "split-int8", "--profiles", "wifi,4g", "--json", str(out)]) == 0
    timed = json.loads(out.read_text())["methods"]["split-int8"]["rounds_timed"]
    assert set(timed) == {"wifi", "4g"}
    for r in timed.values():
        assert r["round_seconds"] > 0 and r["device_cpu_s_per_step"] > 0
        assert set(r["cpu_seconds"]) == {"cloud", "edge-0", *(f"user-{i}" for i in range(4))}
