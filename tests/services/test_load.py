"""Load (``slow``): 16 concurrent users through 2 edges for several rounds as real processes; every round commits
with nobody dropped, and no tier's resident memory keeps growing once the first round has warmed it up.

Memory is read from each process's own /metrics (``process_resident_memory_bytes``) after every round. The
figures are printed (``-s``) and written to ``load-rss.json`` in the test's temporary directory.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

USERS, EDGES, ROUNDS = 16, 2, 5
LOAD_ARGS = ["--model", "tiny-bert", "--split", "1,3", "--data", "trec", "--local-steps", "10", "--batch-size", "4",
             "--max-examples-per-client", "32", "--eval-examples-per-client", "8", "--max-len", "32", "--seed", "11"]
MB = 1 << 20
GROWTH_LIMIT = (0.10, 30 * MB)  # from round 2 to the last: more than 10 % or more than 30 MB fails


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def rss(url: str) -> int:
    return int(metric(httpx.get(f"{url}/metrics", timeout=30).text, "process_resident_memory_bytes"))


@pytest.mark.slow
def test_sixteen_users_through_two_edges_for_five_rounds(tmp_path):
    from shared.lab.cluster import Cluster

    cluster = Cluster(tmp_path / "load", LOAD_ARGS, users=USERS, edges=EDGES)
    t0 = time.monotonic()
    cluster.start(timeout=600)
    started = time.monotonic() - t0
    samples: dict[str, list[int]] = {name: [] for name in cluster.procs}
    seconds: list[float] = []
    try:
        for expected in range(1, ROUNDS + 1):
            t = time.monotonic()
            rid = cluster.start_round({})  # the configured defaults, evaluation included
            view = cluster.wait_round(rid, timeout=600)
            seconds.append(time.monotonic() - t)
            assert view["state"] == "committed", view
            assert view["version"] == expected
            assert view["metrics"]["dropped"] == [] and len(view["metrics"]["users"]) == USERS, view["metrics"]
            assert "eval_loss" in view["metrics"] and "eval_error" not in view["metrics"], view["metrics"]
            end = time.monotonic() + 60  # "committed" shows a moment before the version is current (test_faults.py)
            while cluster.cloud.wait_healthy()["version"] < expected:
                assert time.monotonic() < end, "the committed version never became current"
                time.sleep(0.05)
            for name, proc in cluster.procs.items():
                samples[name].append(rss(proc.url))
        cloud_metrics = httpx.get(f"{cluster.cloud.url}/metrics", timeout=30).text
        assert metric(cloud_metrics, "splitllm_rounds", '{state="committed"}') == ROUNDS
        assert metric(cloud_metrics, "splitllm_rounds", '{state="failed"}') == 0
        assert metric(cloud_metrics, "splitllm_open_sessions") == 0, "sessions left open at the cloud"
        for e in range(EDGES):
            text = httpx.get(f"{cluster.procs[f'edge-{e}'].url}/metrics", timeout=30).text
            assert metric(text, "splitllm_open_sessions") == 0, f"sessions left open at edge-{e}"
        for i in range(USERS):
            text = httpx.get(f"{cluster.procs[f'user-{i}'].url}/metrics", timeout=30).text
            assert metric(text, "splitllm_jobs", '{state="failed"}') == 0, f"user-{i} failed a job"
            assert metric(text, "splitllm_jobs", '{state="reported"}') == 2 * ROUNDS  # train + eval each round
    finally:
        cluster.stop()
    logs = {name: proc.log.read_text(errors="replace") for name, proc in cluster.procs.items()}

    report = {"users": USERS, "edges": EDGES, "rounds": ROUNDS, "startup_seconds": round(started, 1),
              "round_seconds": [round(s, 1) for s in seconds],
              "rss_mb": {name: [round(v / MB, 1) for v in vals] for name, vals in samples.items()}}
    (tmp_path / "load-rss.json").write_text(json.dumps(report, indent=1))
    users_by_round = list(zip(*(samples[f"user-{i}"] for i in range(USERS))))
    print(f"\nstart-up {started:.0f} s; rounds {', '.join(f'{s:.1f}' for s in seconds)} s")
    for name in ("cloud", *(f"edge-{e}" for e in range(EDGES))):
        print(f"{name:>7} RSS MB per round: {[round(v / MB, 1) for v in samples[name]]}")
    print(f"  users RSS MB per round (min/mean/max): "
          f"{[(round(min(r) / MB), round(sum(r) / len(r) / MB), round(max(r) / MB)) for r in users_by_round]}")

    for name, text in logs.items():
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-3000:]}"
    grown = {}
    for name, vals in samples.items():
        growth = vals[-1] - vals[1]
        if growth > GROWTH_LIMIT[0] * vals[1] or growth > GROWTH_LIMIT[1]:
            grown[name] = [round(v / MB, 1) for v in vals]
    assert not grown, f"resident memory grew from round 2 to round {ROUNDS} (MB per round): {grown}"
