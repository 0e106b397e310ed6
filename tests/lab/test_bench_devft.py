"""``splitllm bench devft --quick``: both methods run from the same seeds, the report and the plot are written."""

from __future__ import annotations

import json

import pytest

from shared.lab.bench import devft as bench


def test_the_quick_bench_compares_both_methods_from_the_same_seeds(tmp_path, hermetic_cache) -> None:
    out, plot = tmp_path / "devft.json", tmp_path / "devft.png"
    assert bench.main(["--quick", "--seeds", "0", "--json", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    result = report["settings"]["tiny-llama"]
    assert set(result["runs"]) == {"0"} and plot.stat().st_size > 0
    for run in result["runs"].values():
        plain, devft = run["plain"], run["devft"]
        assert plain[0]["eval_loss"] == devft[0]["eval_loss"]  # the same version 0 and held-out data
        assert [r["stage"] for r in devft[1:3]] == [1, 2]
        assert devft[1]["blocks_per_step"] == {"user": 1.0, "edge": 1.0, "cloud": 1.0}
        assert plain[1]["blocks_per_step"] == {"user": 1.0, "edge": 2.0, "cloud": 1.0}
        assert devft[1]["train_bytes"]["user_edge"]["up"] > 0
        assert devft[1]["bytes"] < plain[1]["bytes"]  # stage 1 moves fewer adapters
        assert devft[1]["compute_seconds"] < plain[1]["compute_seconds"]  # and runs fewer blocks
        assert run["target"] == pytest.approx(sum(r["eval_loss"] for r in plain[-2:]) / 2)  # smoothed over its 2 rounds
        assert run["reach"]["plain"] is not None
    summary = result["summary"]
    assert summary["seeds"] == 1 and summary["plain_eval_loss_at_2"]["se"] >= 0
    assert set(summary["per_round"]) == {"plain", "stage 1", "stage 2"}
    assert summary["per_round"]["stage 1"]["compute_seconds"]["mean"] < summary["per_round"]["plain"]["compute_seconds"]["mean"]
    assert summary["plain_total"]["bytes"]["mean"] == result["runs"]["0"]["plain"][-1]["bytes"]
    ceiling = summary["bytes_ceiling"]  # the same batches: plain's round 1 minus DevFT's is stage 1's adapter saving
    assert ceiling["largest_round_saving"]["mean"] >= plain[1]["bytes"] - devft[1]["bytes"] > 0
    assert ceiling["ratio"]["mean"] > 1

    other = tmp_path / "seed7.json"  # a run of another seed (here the same run under another number): merged
    report["seeds"], report["settings"]["tiny-llama"]["runs"] = [7], {"7": result["runs"]["0"]}
    other.write_text(json.dumps(report))
    merged = tmp_path / "merged.json"
    assert bench.main(["--report", f"{out},{other}", "--json", str(merged)]) == 0
    both = json.loads(merged.read_text())
    assert both["seeds"] == [0, 7] and list(both["settings"]["tiny-llama"]["runs"]) == ["0", "7"]
    assert both["settings"]["tiny-llama"]["summary"]["seeds"] == 2
    with pytest.raises(ValueError, match=r"seeds \['7'\] of 'tiny-llama' are in more than one report"):
        bench.main(["--report", f"{other},{other}"])


@pytest.mark.slow  # two more quick benches, one in a spawned process: a minute or two on the 2-core machine
def test_seeds_in_worker_processes_give_the_same_runs_and_a_report_is_summarised_again(tmp_path, hermetic_cache,
                                                                                          capsys) -> None:
    serial, parallel = tmp_path / "serial.json", tmp_path / "parallel.json"
    assert bench.main(["--quick", "--seeds", "1", "--json", str(serial)]) == 0
    assert bench.main(["--quick", "--seeds", "1", "--jobs", "2", "--json", str(parallel)]) == 0  # in a worker
    one, other = (json.loads(p.read_text())["settings"]["tiny-llama"] for p in (serial, parallel))
    for method in ("plain", "devft"):
        assert [r["eval_loss"] for r in other["runs"]["1"][method]] == [r["eval_loss"] for r in one["runs"]["1"][method]]
    capsys.readouterr()
    assert bench.main(["--report", str(parallel)]) == 0
    printed = capsys.readouterr().out
    assert "seeds [1]" in printed and "a stage 1 round" in printed and "whole runs" in printed
