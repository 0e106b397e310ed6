"""The method benches' shared protocol: step sizes from a grid or given, smoothing, summaries."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shared.lab.bench.protocol import first_reach, parse_lrs, smooth, summary, tune_and_run


def test_each_method_is_tuned_on_the_grid_at_the_tuning_seed_unless_its_step_size_is_given() -> None:
    calls: list[tuple[float, int]] = []

    def run(lr: float, seed: int) -> dict[str, float]:
        calls.append((lr, seed))
        return {"mean_last3_accuracy": -abs(lr - 5e-3)}  # the grid's middle value is best

    args = SimpleNamespace(lrs="", grid="2.5e-3,5e-3,1e-2", tuning_seed=100, seed=0, seeds=3)
    lr, tried, runs = tune_and_run("lora", run, args)
    assert lr == 5e-3 and [t["lr"] for t in tried] == [2.5e-3, 5e-3, 1e-2] and len(runs) == 3
    assert calls == [(2.5e-3, 100), (5e-3, 100), (1e-2, 100), (5e-3, 0), (5e-3, 1), (5e-3, 2)]
    calls.clear()
    args.lrs = "lora=0.01, fedara=2e-3"
    assert parse_lrs(args.lrs) == {"lora": 0.01, "fedara": 2e-3}
    lr, tried, _ = tune_and_run("lora", run, args)  # given: no grid runs
    assert lr == 0.01 and tried == [] and calls == [(0.01, 0), (0.01, 1), (0.01, 2)]
    with pytest.raises(SystemExit, match="METHOD=LR"):
        parse_lrs("lora")


def test_the_target_is_read_off_a_trailing_mean_and_figures_carry_their_standard_error() -> None:
    assert smooth([3.0, 1.0, 2.0, 0.0]) == pytest.approx([3.0, 2.0, 2.0, 1.0])
    assert first_reach(smooth([3.0, 1.0, 2.0, 0.0]), 2.0) == 1 and first_reach([3.0], 1.0) is None
    s = summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["se"] == pytest.approx(1 / 3 ** 0.5) and summary([4.0])["se"] == 0.0
