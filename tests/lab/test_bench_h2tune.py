"""``splitllm bench h2tune`` on tiny models: every method, every task, the report's fields."""

from __future__ import annotations

import json

import torch

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


def test_a_client_alone_in_its_model_trains_the_same_adapters_as_local_only(hermetic_cache) -> None:
    """The naive baseline's client that is its model's only user is a federation of one inside the federation: under
    the same user id (its batch order) it ends with exactly the adapters and accuracy of its local-only run, so
    nothing of the other deployment (keys, heads, clipping, learning rate, steps) reaches it."""
    import argparse

    from shared.lab.bench.h2tune import parse_clients, sim_config
    from shared.lab.sim import Simulation

    args = argparse.Namespace(rounds=2, local_steps=2, batch_size=2, lr=None, max_len=24, max_examples=8,
                              eval_examples=8, h2tune_config={})
    clients = parse_clients("tiny-bert/trec/4,tiny-bert/sms_spam/8,tiny-llama/sentiment/8")
    runs = []
    for config in (sim_config(args, clients, 0, "fedavg"), sim_config(args, clients[2:], 0, "fedavg", ["user-2"])):
        sim = Simulation(config)
        runs.append((sim, [sim.run_round() for _ in range(args.rounds)]))
    (mixed, mixed_rows), (alone, alone_rows) = runs
    assert [r["tasks"]["tiny-llama/sentiment"]["eval_loss"] for r in mixed_rows] == [r["eval_loss"] for r in alone_rows]
    for tier, state in alone.coordinator.global_state.items():
        theirs = mixed.coordinator.global_state[tier]
        for key, value in state.items():
            match = [k for k in theirs if k.startswith("tiny-llama/") and k.endswith("/" + key.split("/")[-1])
                     and k.removeprefix("tiny-llama/").removeprefix("sentiment/") == key]
            assert len(match) == 1 and torch.equal(theirs[match[0]], value), key
