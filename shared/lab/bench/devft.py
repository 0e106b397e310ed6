"""``splitllm bench devft``: DevFT against plain split LoRA (FedAvg) with the same seeds, on two models.

For each setting (smollm2-135m on Shakespeare, the paper's decoder setting; minilm-l6 on TREC) and
each seed, two simulations share the data partition, split, initial adapters and round settings:
plain split LoRA (``fedavg``) for ``rounds`` rounds, and ``devft`` with the setting's stage schedule
for up to ``devft_rounds`` rounds (so that it can run past the plain run's length to reach its loss).
After every training round, the new version is evaluated on the users' held-out splits (under the
round's algorithm: a DevFT stage's version is that stage's fused submodel).

* **Target**: the plain run's final held-out loss, smoothed (the mean of its last 3 rounds), and a
  run reaches it at the first round where its own smoothed curve is at or below it.
* **Bytes**: every message of the training rounds on both hops, both ways (the evaluations' are not
  counted: they are the measurement, not the training).
* **Time**: a virtual clock (``Clock``), because wall time on this shared machine is noise. A round's
  time is one user's chain, the users training in parallel: its steps' blocks on the three tiers
  (``blocks_per_step`` in the round's metrics) at a block's cost, plus each step's other compute
  (embeddings, head, loss), plus its training bytes on its own link (``--user-link``) and its share
  of its edge's (``--edge-link``) at the profiles' rates, with their delay per message. The two costs
  are read off the seed's plain run (medians over its rounds of the compute the tiers measured: the
  edge's per block it ran; the user's and cloud's beyond their blocks, per step) and used for both
  methods. The compute part alone is reported too.
* **Quality**: held-out loss, and accuracy (TREC) or perplexity (Shakespeare), after ``rounds``
  rounds for both methods, and DevFT's after its last round.

* **Bytes ceiling**: the most DevFT's fewer adapters can save (``devft_report.bytes_ceiling``).

Figures are means over the seeds with their standard errors; ratios (plain / DevFT) are per seed (the
summaries, merged reports, table and plot: ``shared.lab.bench.devft_report``).
The settings are sized so that the whole bench completes on the 2-core machine (``SETTINGS``);
``--quick`` runs a tiny-model smoke test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config.round import RoundConfig
from shared.lab.bench.devft_report import merge_reports, plot, print_table, resummarise, summarise
from shared.lab.bench.protocol import first_reach, smooth
from shared.lab.bench.timing import write_json
from shared.lab.sim import SimConfig, Simulation
from shared.protocol.links import LinkProfile, get_profile

TARGETS = {"bytes": 2.0, "time": 1.5}  # the issue's: DevFT's ratios on at least one of the models


@dataclass(frozen=True)
class Setting:
    """One model and data set, with its split, round sizes and DevFT's schedule."""

    model: str
    data: str
    split: tuple[int, int]
    layers: list[int]  # DevFT's stages
    stage_rounds: list[int]  # committed rounds of each stage
    rounds: int  # the plain run's rounds
    devft_rounds: int  # DevFT's at most
    users: int = 4
    edges: int = 2
    local_steps: int = 10
    batch_size: int = 16
    max_len: int = 32
    max_examples: int = 256
    eval_examples: int = 32
    extra: dict[str, Any] = field(default_factory=dict)


SETTINGS = {
    "smollm2": Setting("smollm2-135m", "shakespeare", (2, 15), [4, 8, 16, 30], [1, 1, 1, 1], rounds=6, devft_rounds=10,
                       users=2, edges=1, local_steps=4, batch_size=4, max_len=64, max_examples=64, eval_examples=16),
    "minilm": Setting("minilm-l6", "trec", (1, 3), [3, 4, 6], [2, 2, 2], rounds=12, devft_rounds=20),
}
QUICK = {
    "tiny-llama": Setting("tiny-llama", "shakespeare", (1, 3), [3, 4], [1, 1], rounds=2, devft_rounds=3, users=2,
                          edges=1, local_steps=2, batch_size=2, max_len=16, max_examples=8, eval_examples=2),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitllm bench devft", description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="smollm2,minilm", help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for a standard error)")
    p.add_argument("--user-link", default="wifi", help="link profile of each user's hop (link_profiles.json)")
    p.add_argument("--edge-link", default="fiber", help="link profile of each edge's hop to the cloud")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at a time, each in its own process")
    p.add_argument("--report", default=None, help="print the table (and --plot) of reports written earlier, their "
                                                  "summaries recomputed, instead of running; several comma-separated "
                                                  "paths (e.g. one seed each) are merged into one report (--json)")
    p.add_argument("--quick", action="store_true", help="a tiny-model smoke test instead of the settings")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write the curves here (PNG)")
    return p.parse_args(argv)


# --- one run --------------------------------------------------------------------------------------------------


def sim_config(setting: Setting, seed: int, algorithm: str, rounds: int) -> SimConfig:
    config = {"layers": setting.layers, "rounds": setting.stage_rounds} if algorithm == "devft" else {}
    return SimConfig(model=setting.model, data=setting.data, users=setting.users, edges=setting.edges, rounds=rounds,
                     split=setting.split, max_len=setting.max_len, max_examples_per_client=setting.max_examples,
                     eval_examples_per_client=setting.eval_examples, seed=seed,
                     round=RoundConfig(local_steps=setting.local_steps, batch_size=setting.batch_size,
                                       algorithm=algorithm, config=config, deadline=None))


@dataclass(frozen=True)
class Clock:
    """The virtual clock of one seed: a block's seconds and a step's other compute, read off the plain run."""

    block_s: float  # one block's forward, backward and optimizer step, for one step of one user
    step_s: float  # the rest of a step's compute: embeddings, head and loss
    links: dict[str, LinkProfile | None]

    @classmethod
    def calibrate(cls, setting: Setting, plain: list[dict[str, Any]], links: dict[str, LinkProfile | None]) -> Clock:
        """Medians over the plain run's rounds: the edge's measured compute per block it ran (it runs blocks only),
        and the user's and cloud's compute beyond their blocks at that cost, per step."""
        blocks, rests = [], []
        for row in plain[1:]:
            steps = setting.users * setting.local_steps
            measured, per_step = row["measured_compute_seconds"], row["blocks_per_step"]
            if not per_step["edge"]:
                raise ValueError("the clock reads a block's cost off the edge: give the edge blocks (--split a,b, a < b)")
            block = measured["edge"] / (steps * per_step["edge"])
            blocks.append(block)
            rests.append(max(0.0, (measured["user"] + measured["cloud"]) / steps
                             - (per_step["user"] + per_step["cloud"]) * block))
        return cls(statistics.median(blocks), statistics.median(rests), links)

    def round_seconds(self, setting: Setting, row: dict[str, Any]) -> tuple[float, float]:
        """(compute, link) seconds of one user's chain in a training round; the users are alike (same steps, blocks).

        Compute: each step's blocks on the three tiers and its other compute. Link: the round's training
        bytes on the user's own hop (the hop's / users) and its share of its edge's hop (/ edges: the
        edge's users take turns), at the profiles' rates, plus the delay of each step's request and reply.
        """
        compute = setting.local_steps * (sum(row["blocks_per_step"].values()) * self.block_s + self.step_s)
        link = 0.0
        for hop, sharing in (("user_edge", setting.users), ("edge_cloud", setting.edges)):
            profile = self.links[hop]
            if profile is not None:
                sent = row["train_bytes"][hop]
                link += (sent["up"] * 8 / (profile.up_mbps * 1e6) + sent["down"] * 8 / (profile.down_mbps * 1e6)) / sharing
                link += setting.local_steps * 2 * profile.delay_ms / 1000.0
        return compute, link

    def add_time(self, setting: Setting, rows: list[dict[str, Any]]) -> None:
        """Cumulative ``seconds`` and ``compute_seconds`` on every row."""
        total = compute_total = 0.0
        for row in rows:
            if row["round"]:
                compute, link = self.round_seconds(setting, row)
                total, compute_total = total + compute + link, compute_total + compute
            row["seconds"], row["compute_seconds"] = total, compute_total


def run_method(setting: Setting, seed: int, algorithm: str, rounds: int, stop: float | None = None,
               at_least: int = 0, log: Any = print) -> list[dict[str, Any]]:
    """The round-0 evaluation, then training rounds (each evaluated), with cumulative training bytes.

    With ``stop``, the run ends early once its smoothed held-out loss is at or below it and it has run
    ``at_least`` rounds.
    """
    sim = Simulation(sim_config(setting, seed, algorithm, rounds))
    base = sim.evaluate_only()
    rows = [{"round": 0, "eval_loss": base["eval_loss"], **_quality(base), "bytes": 0}]
    total_bytes = 0
    for _ in range(rounds):
        row = sim.run_round()
        metrics = sim.coordinator.rounds[row["round"]].metrics
        train_bytes = {h: {d: metrics["bytes"][h][d] - metrics["eval_bytes"][h][d] for d in ("up", "down")}
                       for h in ("user_edge", "edge_cloud")}
        total_bytes += sum(n for hop in train_bytes.values() for n in hop.values())
        rows.append({"round": row["round"], "eval_loss": row["eval_loss"], **_quality(row),
                     "train_loss": row["train_loss"], "bytes": total_bytes, "train_bytes": train_bytes,
                     "blocks_per_step": metrics["blocks_per_step"], "measured_compute_seconds": metrics["compute_seconds"],
                     "wall_seconds": row["seconds"], **({"stage": metrics["devft"]["stage"]} if "devft" in metrics else {})})
        log(f"  {setting.model} seed {seed} {algorithm:6s} round {row['round']:2d}: held-out {row['eval_loss']:.4f}"
            f"  training bytes {total_bytes / 1e6:8.2f} MB" + (f"  stage {rows[-1]['stage']}" if "stage" in rows[-1]
                                                                 else ""))
        if stop is not None and len(rows) - 1 >= at_least and smooth([r["eval_loss"] for r in rows[1:]])[-1] <= stop:
            break
    return rows


def _quality(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("eval_accuracy", "eval_perplexity") if k in row}


def reach(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Where a run's smoothed held-out loss first gets to ``target``: its round, cumulative bytes and time."""
    i = first_reach(smooth([r["eval_loss"] for r in rows[1:]]), target)
    if i is None:
        return None
    row = rows[i + 1]
    return {"round": row["round"], "bytes": row["bytes"], "seconds": row["seconds"],
            "compute_seconds": row["compute_seconds"]}


# --- the bench ------------------------------------------------------------------------------------------------


def run_seed(setting: Setting, seed: int, links: dict[str, LinkProfile | None], log: Any = print) -> dict[str, Any]:
    """Both methods from one seed, on the seed's virtual clock, and where each reaches the plain run's final loss."""
    plain = run_method(setting, seed, "fedavg", setting.rounds, log=log)
    target = smooth([r["eval_loss"] for r in plain[1:]])[-1]
    devft = run_method(setting, seed, "devft", setting.devft_rounds, stop=target, at_least=setting.rounds, log=log)
    clock = Clock.calibrate(setting, plain, links)
    for rows in (plain, devft):
        clock.add_time(setting, rows)
    return {"target": target, "clock": {"block_ms": clock.block_s * 1e3, "step_ms": clock.step_s * 1e3},
            "plain": plain, "devft": devft, "reach": {"plain": reach(plain, target), "devft": reach(devft, target)}}


def bench_setting(setting: Setting, seeds: list[int], links: dict[str, LinkProfile | None],
                  log: Any = print, jobs: int = 1) -> dict[str, Any]:
    """Every seed of one setting; with ``jobs`` > 1, that many seeds at a time in worker processes. Each seed's
    clock is read off its own plain run and used for both methods, so the workers' sharing of the CPU scales
    both methods' compute alike (as other load on the machine does)."""
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {seed: pool.submit(run_seed, setting, seed, links, print) for seed in seeds}
            runs = {seed: future.result() for seed, future in futures.items()}
    else:
        runs = {seed: run_seed(setting, seed, links, log) for seed in seeds}
    return {"setting": {**setting.__dict__, "split": list(setting.split)}, "runs": runs,
            "summary": summarise(setting.rounds, runs)}


def run_bench(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    settings = QUICK if args.quick else {n: SETTINGS[n] for n in args.settings.split(",") if n}
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    started = time.perf_counter()
    report: dict[str, Any] = {"seeds": seeds, "user_link": args.user_link, "edge_link": args.edge_link,
                              "targets": TARGETS, "settings": {}}
    links = {"user_edge": get_profile(args.user_link), "edge_cloud": get_profile(args.edge_link)}
    for name, setting in settings.items():
        report["settings"][name] = bench_setting(setting, seeds, links, log, args.jobs)
        report["wall_seconds"] = time.perf_counter() - started
        write_json(report, args.json)  # after each setting: a long bench keeps what it has
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        report = resummarise(merge_reports([json.loads(Path(path).read_text()) for path in args.report.split(",")]))
        write_json(report, args.json)
    else:
        report = run_bench(args)
    print_table(report)
    if args.plot:
        plot(report, args.plot)
    return 0
