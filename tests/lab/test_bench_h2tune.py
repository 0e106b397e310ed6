"""``splitllm bench h2tune`` on tiny models: every method, every task, the report's fields."""

from __future__ import annotations

import json

from shared.lab.bench.h2tune import main


def test_the_bench_reports_per_task_accuracy_average_and_bytes_per_method(hermetic_cache, tmp_path) -> None:
    out = tmp_path / "h2tune.json"
    assert main(["--clients", "tiny-bert/trec/4,tiny-bert/sms_spam/8,tiny-llama/sentiment/8", "--rounds", "2",
                 "--local-steps", "1", "--batch-size", "2", "--seeds", "0,1", "--max-examples", "8",
                 "--eval-examples", "4", "--max-len", "24", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [m["method"] for m in report["methods"]] == ["local", "naive", "h2tune"]
    for m in report["methods"]:
        assert sorted(m["accuracy"]) == ["tiny-bert/sms_spam", "tiny-bert/trec", "tiny-llama/sentiment"]
        assert len(m["runs"]) == 2 and all(len(r["bytes_per_round"]) == 2 for r in m["runs"])
        assert 0 <= m["average"]["mean"] <= 1 and m["average"]["se"] >= 0 and m["bytes_per_round"] > 0
    by = {m["method"]: m for m in report["methods"]}
    assert by["h2tune"]["bytes_per_round"] < by["naive"]["bytes_per_round"]  # A and B never travel
