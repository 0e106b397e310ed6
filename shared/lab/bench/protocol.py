"""The protocol the method benches share (``bench fedara``, ``bench droppeft``): seeds, a step-size grid, summaries.

* Each method's learning rate is chosen from the same small grid (``LR_GRID``: the project's
  classification default 5e-3, half and double it) by one run per value at a tuning seed that is
  not among the reported seeds (so the choice does not flatter the reported figures), on the mean
  held-out accuracy of the last 3 rounds.
  ``--lrs METHOD=LR,...`` gives a method's step size instead (say, a grid's outcome from an
  earlier run at the same scale), and no grid runs for it.
* Then each method runs at the reported seeds (at least 3) with its chosen learning rate. A figure
  is the mean over seeds with its standard error; a comparison is the mean of the per-seed
  differences (or ratios) with theirs: both methods share a seed's data partition and initial
  adapters, so pairing removes what the seed does to both.
* Quality is the mean held-out accuracy of the last 3 rounds (one round under non-IID data moves
  by a few points).
* A target loss is read off a smoothed curve (``smooth``: the mean of the last ``window`` rounds), so
  that one lucky round does not set it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

LR_GRID = (2.5e-3, 5e-3, 1e-2)
TUNING_SEED = 100
LAST_ROUNDS = 3


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "se", "values"}`` of per-seed figures."""
    mean, se = mean_se(values)
    return {"mean": mean, "se": se, "values": list(values)}


def mean_last(values: Sequence[float], n: int = LAST_ROUNDS) -> float:
    """Mean of the last ``n`` values (the rounds after round 0)."""
    tail = list(values)[-n:]
    return statistics.fmean(tail)


def smooth(values: Sequence[float], window: int = LAST_ROUNDS) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start): the curve a target is read from."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(statistics.fmean(part))
    return out


def first_reach(curve: Sequence[float], target: float) -> int | None:
    """The first index where ``curve`` is at or below ``target`` (None: never)."""
    return next((i for i, v in enumerate(curve) if v <= target), None)


def choose_lr(run: Callable[[float, int], dict[str, Any]], quality: Callable[[dict[str, Any]], float],
              grid: Sequence[float] = LR_GRID, seed: int = TUNING_SEED) -> tuple[float, list[dict[str, Any]]]:
    """Run ``run(lr, seed)`` for each ``lr`` of the grid; the lr of the best ``quality`` and each run's figures."""
    tried = []
    for lr in grid:
        result = run(lr, seed)
        tried.append({"lr": lr, "seed": seed, "quality": quality(result), "result": result})
    best = max(tried, key=lambda t: t["quality"])
    return best["lr"], tried


def parse_lrs(text: str) -> dict[str, float]:
    """``METHOD=LR,...`` (``--lrs``): step sizes given instead of a grid search, e.g. a grid's outcome from an earlier run."""
    out = {}
    for part in (x for x in text.split(",") if x.strip()):
        method, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--lrs takes METHOD=LR,... (got '{part}')")
        out[method.strip()] = float(value)
    return out


def pick_lr(method: str, run: Callable[[float, int], dict[str, Any]], quality: Callable[[dict[str, Any]], float],
            args: Any) -> tuple[float, list[dict[str, Any]]]:
    """``method``'s step size: from ``args.lrs`` if given there, else the grid's best at the tuning seed (a one-value
    grid: that value, no runs)."""
    given = parse_lrs(args.lrs)
    if method in given:
        return given[method], []
    grid = [float(x) for x in args.grid.split(",")]
    return choose_lr(run, quality, grid, args.tuning_seed) if len(grid) > 1 else (grid[0], [])


def tune_and_run(method: str, run: Callable[[float, int], dict[str, Any]], args: Any
                 ) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """``method``'s step size (``pick_lr``, on last-3 accuracy), the grid's runs, and its runs at the reported seeds."""
    lr, tried = pick_lr(method, run, lambda r: r["mean_last3_accuracy"], args)
    return lr, tried, [run(lr, seed) for seed in range(args.seed, args.seed + args.seeds)]


def fmt(s: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± se`` of a ``summary``."""
    return f"{s['mean'] * scale:.{digits}f} ± {s['se'] * scale:.{digits}f}"
