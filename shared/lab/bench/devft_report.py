"""``splitllm bench devft``'s report: the summaries over the seeds (reach, ratios, per-round costs, the bytes
ceiling), reports merged, the table and the plot (the runs themselves: ``shared.lab.bench.devft``)."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from shared.lab.bench.protocol import summary as mean_se


def summarise(rounds: int, runs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """Means and standard errors over the seeds' runs of one setting (whose plain runs ran ``rounds``)."""
    reached = [r for r in runs.values() if r["reach"]["devft"] is not None]
    out: dict[str, Any] = {"seeds": len(runs), "devft_reached": len(reached)}
    for measure in ("bytes", "seconds", "compute_seconds"):
        for method in ("plain", "devft"):
            values = [r["reach"][method][measure] for r in reached]
            out[f"{method}_{measure}_to_target"] = mean_se(values) if values else None
        out[f"{measure}_ratio"] = mean_se([r["reach"]["plain"][measure] / r["reach"]["devft"][measure]
                                           for r in reached]) if reached else None
    at = rounds
    for method in ("plain", "devft"):
        for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
            values = [r[method][at][key] for r in runs.values() if len(r[method]) > at and key in r[method][at]]
            if values:
                out[f"{method}_{key}_at_{at}"] = mean_se(values)
    for method in ("plain", "devft"):  # the whole runs, reached or not
        out[f"{method}_total"] = {m: mean_se([r[method][-1][m] for r in runs.values()])
                                  for m in ("bytes", "seconds", "compute_seconds")}
    out["per_round"] = per_round(runs)
    out["bytes_ceiling"] = bytes_ceiling(runs)
    last = [r["devft"][-1] for r in runs.values()]
    out["devft_rounds_run"] = [row["round"] for row in last]
    for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
        if all(key in row for row in last):
            out[f"devft_{key}_last"] = mean_se([row[key] for row in last])
    return out


def per_round(runs: dict[Any, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A training round's cost, plain's and each DevFT stage's: training bytes and virtual seconds (all and
    compute alone), each seed's mean over its rounds of that kind, then the mean over the seeds."""
    costs: dict[str, list[dict[str, float]]] = {}
    for run in runs.values():
        seed_rows: dict[str, list[dict[str, float]]] = {}
        for method in ("plain", "devft"):
            rows = run[method]
            for before, row in itertools.pairwise(rows):
                kind = f"stage {row['stage']}" if method == "devft" else "plain"
                seed_rows.setdefault(kind, []).append({m: row[m] - before[m] for m in ("bytes", "seconds",
                                                                                    "compute_seconds")})
        for kind, rows in seed_rows.items():
            costs.setdefault(kind, []).append({m: statistics.fmean(r[m] for r in rows) for m in rows[0]})
    return {kind: {m: mean_se([c[m] for c in seeds]) for m in seeds[0]} for kind, seeds in costs.items()}


def bytes_ceiling(runs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The most DevFT's smaller submodels can save on bytes. A round's training bytes are its activations' (the
    same whatever the depth) plus its adapters'; plain and DevFT draw the same batches in the same round, so
    plain's round minus DevFT's same round is what DevFT's fewer adapters saved (0 at full depth). Per seed: the
    largest such saving, its share of plain's mean round, and the bytes ratio DevFT would reach were every round
    to save that much and it reached the target in plain's rounds: plain's round / (plain's round - saving)."""
    saved, share, ceiling = [], [], []
    for run in runs.values():
        plain_round = run["plain"][-1]["bytes"] / (len(run["plain"]) - 1)
        best = max((p1["bytes"] - p0["bytes"]) - (d1["bytes"] - d0["bytes"])
                   for (p0, p1), (d0, d1) in zip(itertools.pairwise(run["plain"]), itertools.pairwise(run["devft"])))
        saved.append(best)
        share.append(best / plain_round)
        ceiling.append(plain_round / (plain_round - best))
    return {"largest_round_saving": mean_se(saved), "saving_share": mean_se(share), "ratio": mean_se(ceiling)}


def resummarise(report: dict[str, Any]) -> dict[str, Any]:
    """A report written earlier, its summaries recomputed from its runs (``--report``)."""
    for result in report["settings"].values():
        result["summary"] = summarise(result["setting"]["rounds"], result["runs"])
    return report


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Reports of the same settings and links from different seeds (a run per seed, say) as one report."""
    merged = reports[0]
    for other in reports[1:]:
        if (other["user_link"], other["edge_link"]) != (merged["user_link"], merged["edge_link"]):
            raise ValueError("the reports were run on different links; they cannot be merged")
        for name, result in other["settings"].items():
            mine = merged["settings"].setdefault(name, result)
            if mine is result:
                continue
            if mine["setting"] != result["setting"]:
                raise ValueError(f"the reports' '{name}' settings differ; they cannot be merged")
            if twice := set(mine["runs"]) & set(result["runs"]):
                raise ValueError(f"seeds {sorted(twice)} of '{name}' are in more than one report")
            mine["runs"] = dict(sorted({**mine["runs"], **result["runs"]}.items(), key=lambda kv: int(kv[0])))
        merged["seeds"] = sorted({*merged["seeds"], *other["seeds"]})
        merged["wall_seconds"] = merged.get("wall_seconds", 0.0) + other.get("wall_seconds", 0.0)
    return merged


def _fmt(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if s is None else f"{s['mean'] * scale:.{digits}f} ± {s['se'] * scale:.{digits}f}"


def print_table(report: dict[str, Any], log: Any = print) -> None:
    for name, result in report["settings"].items():
        s, setting = result["summary"], result["setting"]
        at = setting["rounds"]
        log(f"{name} ({setting['model']} / {setting['data']}), seeds {report['seeds']}: DevFT reached the plain "
            f"run's final held-out loss in {s['devft_reached']} of {s['seeds']} seeds")
        log(f"  bytes to target (MB): plain {_fmt(s['plain_bytes_to_target'], 1e-6)}  devft "
            f"{_fmt(s['devft_bytes_to_target'], 1e-6)}  ratio {_fmt(s['bytes_ratio'])}")
        log(f"  time to target (s):   plain {_fmt(s['plain_seconds_to_target'])}  devft "
            f"{_fmt(s['devft_seconds_to_target'])}  ratio {_fmt(s['seconds_ratio'])}  "
            f"(compute alone: ratio {_fmt(s['compute_seconds_ratio'])})")
        log(f"  whole runs: plain {at} rounds, {_fmt(s['plain_total']['bytes'], 1e-6)} MB, "
            f"{_fmt(s['plain_total']['seconds'])} s;  devft {s['devft_rounds_run']} rounds, "
            f"{_fmt(s['devft_total']['bytes'], 1e-6)} MB, {_fmt(s['devft_total']['seconds'])} s")
        ceiling = s["bytes_ceiling"]
        log(f"  bytes ceiling: a DevFT round saved at most {_fmt(ceiling['largest_round_saving'], 1e-6)} MB of "
            f"adapters ({_fmt(ceiling['saving_share'], 100, 1)} % of plain's round); saving that in every round, "
            f"in plain's rounds: plain / DevFT {_fmt(ceiling['ratio'], digits=3)}")
        for kind, cost in s["per_round"].items():
            log(f"  a {kind} round: training bytes (MB) {_fmt(cost['bytes'], 1e-6)}  virtual s "
                f"{_fmt(cost['seconds'])}  (compute {_fmt(cost['compute_seconds'])})")
        for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
            if f"plain_{key}_at_{at}" in s:
                log(f"  {key} after {at} rounds: plain {_fmt(s[f'plain_{key}_at_{at}'], digits=4)}  devft "
                    f"{_fmt(s.get(f'devft_{key}_at_{at}'), digits=4)}  (devft after {s['devft_rounds_run']} rounds: "
                    f"{_fmt(s.get(f'devft_{key}_last'), digits=4)})")


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["settings"])
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        result = report["settings"][name]
        for col, (measure, scale, label) in enumerate((("seconds", 1.0, "virtual time (s)"),
                                                       ("bytes", 1e-6, "training bytes (MB)"))):
            ax = axes[row][col]
            for seed, run in result["runs"].items():
                for method, style in (("plain", "C0"), ("devft", "C1")):
                    rows = run[method]
                    ax.plot([r[measure] * scale for r in rows], [r["eval_loss"] for r in rows], color=style,
                            marker="o", ms=2, alpha=0.8, label=method if seed == next(iter(result["runs"])) else None)
                ax.axhline(run["target"], color="grey", lw=0.5, ls="--")
            ax.set_xlabel(label)
            ax.set_ylabel("held-out loss")
            ax.set_title(f"{result['setting']['model']} / {result['setting']['data']}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
