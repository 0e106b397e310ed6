"""``make demo``: one cloud, two edges and four users as separate processes on loopback, a few rounds over REST."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shared.lab.cluster import Cluster

# minilm-l6 on TREC: a round of 4 users x 20 steps takes seconds on 2 CPU cores, so five rounds,
# start-up included, finish in a couple of minutes. smollm2-135m on Shakespeare takes about two
# minutes per round here (80 steps of a 135M model), too long for a first look: `--model smollm2-135m
# --data shakespeare` runs it.


def _steps_done(view: dict[str, Any]) -> int:
    done = 0
    for status in view.get("progress", {}).values():
        m = re.match(r"train step (\d+)/", status)
        if m:
            done += int(m.group(1))
        elif status in ("reported", "evaluated"):
            done += view["request"]["local_steps"]
    return done


def run_round(cluster: Cluster, index: int, total: int) -> dict[str, Any]:
    rid = cluster.start_round()
    view = cluster.get(f"/v1/rounds/{rid}").json()
    steps = view["request"]["local_steps"] * max(len(view["participants"]) or cluster.users, 1)
    with tqdm(total=steps, desc=f"round {index}/{total}", unit="step", leave=True) as bar:
        while True:
            view = cluster.get(f"/v1/rounds/{rid}").json()
            done = min(_steps_done(view), steps)
            if done != bar.n or view["state"] != bar.postfix:
                bar.n = done
                bar.set_postfix_str(view["state"], refresh=False)
                bar.refresh()
            finished = view["state"] in ("failed", "cancelled") or (
                view["state"] == "committed" and "eval_loss" in view["metrics"])
            if finished:
                break
            time.sleep(0.25)
    if view["state"] != "committed":
        raise RuntimeError(f"round {rid} {view['state']}: {view.get('error')}")
    return view


def summarise(views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for v in views:
        m = v["metrics"]
        b = m.get("bytes", {})
        rows.append({
            "round": v["round_id"], "version": v["version"], "train_loss": m.get("train_loss"),
            "eval_loss": m.get("eval_loss"), "eval_accuracy": m.get("eval_accuracy"),
            "eval_perplexity": m.get("eval_perplexity"),
            "bytes": {"user": b.get("user_edge", {}), "edge": b.get("edge_cloud", {})},
            "bytes_up": sum(b.get(h, {}).get("up", 0) for h in ("user_edge", "edge_cloud")),
            "bytes_down": sum(b.get(h, {}).get("down", 0) for h in ("user_edge", "edge_cloud")),
            "seconds": m.get("seconds", 0.0) + m.get("eval_seconds", 0.0),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'round':>5}  {'train_loss':>10}  {'eval_loss':>9}  {'quality':>12}  {'user_up_MB':>10}  {'user_dn_MB':>10}  "
          f"{'edge_up_MB':>10}  {'edge_dn_MB':>10}  {'seconds':>7}")
    for r in rows:
        quality = (f"acc {r['eval_accuracy']:.3f}" if r["eval_accuracy"] is not None
                   else f"ppl {r['eval_perplexity']:.1f}" if r["eval_perplexity"] is not None else "-")
        u, e = r["bytes"]["user"], r["bytes"]["edge"]
        print(f"{r['round']:>5}  {r['train_loss']:>10.4f}  {r['eval_loss']:>9.4f}  {quality:>12}  "
              f"{u.get('up', 0) / 1e6:>10.2f}  {u.get('down', 0) / 1e6:>10.2f}  {e.get('up', 0) / 1e6:>10.2f}  "
              f"{e.get('down', 0) / 1e6:>10.2f}  {r['seconds']:>7.1f}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(rounds, [r["train_loss"] for r in rows], "o-", label="train loss")
    axes[0].plot(rounds, [r["eval_loss"] for r in rows], "s-", label="held-out loss")
    axes[0].set_xlabel("round")
    axes[0].legend()
    quality = "eval_accuracy" if rows[0]["eval_accuracy"] is not None else "eval_perplexity"
    axes[1].plot(rounds, [r[quality] for r in rows], "o-", color="tab:green")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel(quality.replace("eval_", "held-out "))
    width = 0.2
    for i, (tier, d, label) in enumerate([("user", "up", "user->edge"), ("user", "down", "edge->user"),
                                          ("edge", "up", "edge->cloud"), ("edge", "down", "cloud->edge")]):
        axes[2].bar([x + (i - 1.5) * width for x in rounds], [r["bytes"][tier].get(d, 0) / 1e6 for r in rows],
                    width, label=label)
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("MB")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="splitllm demo", description=__doc__)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--data", default="trec")
    p.add_argument("--split", default=None, help="default: 1,3 for minilm-l6, 2,15 for smollm2-135m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--out", default=None, help="output folder (default runs/demo-<time>)")
    args = p.parse_args(argv)
    split = args.split or {"smollm2-135m": "2,15"}.get(args.model, "1,3")
    out = Path(args.out or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    cloud_args = ["--model", args.model, "--data", args.data, "--split", split, "--local-steps", str(args.local_steps)]
    cluster = Cluster(out / "logs", cloud_args, users=4, edges=2)
    print(f"splitllm demo: {args.model} on {args.data}, split {split}; 1 cloud, 2 edges, 4 users on loopback; "
          f"logs in {out / 'logs'}")
    started = time.perf_counter()
    try:
        with tqdm(total=len(cluster.procs), desc="starting tiers", unit="proc") as bar:
            for proc in cluster.procs.values():
                proc.start(cluster.env)
            for proc in cluster.procs.values():
                proc.wait_healthy()
                bar.update(1)
        while cluster.cloud.wait_healthy()["users"] < cluster.users:
            time.sleep(0.3)
        views = [run_round(cluster, i + 1, args.rounds) for i in range(args.rounds)]
    finally:
        cluster.stop()
    rows = summarise(views)
    print_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.json").write_text(json.dumps({"config": vars(args) | {"split": split}, "rounds": rows}, indent=2))
    plot(rows, out / "curves.png", f"{args.model} on {args.data}: 4 users, 2 edges, 1 cloud")
    print(f"\nwrote {out / 'rounds.json'} and {out / 'curves.png'}; {time.perf_counter() - started:.0f} s in all; "
          f"every tier stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
