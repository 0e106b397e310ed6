"""FedARA through the runtime: masks on every tier, untouched masked triplets, fewer bytes, pruning, CLI, benchmark."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from shared.config.round import RoundConfig
from shared.fl.fedara import FedARASession, FedARAStrategy
from shared.fl.svd import INDEX, SCORE, masked_state

PRUNED = ("blocks.0.attention.self.value", "blocks.2.attention.self.query", "blocks.3.attention.self.value")


def sim_settings(**overrides: Any) -> dict[str, Any]:
    """The simulation's fields; round fields (``local_steps``, ``config``, ...) go into its ``RoundConfig``."""
    settings: dict[str, Any] = dict(model="tiny-bert", data="trec", users=4, edges=2, rounds=1, split=(1, 3),
                                    max_len=16, max_examples_per_client=8, eval_examples_per_client=4, adapter="svd",
                                    baseline_eval=False)
    round_fields: dict[str, Any] = dict(local_steps=2, batch_size=4, algorithm="fedara")
    for name, value in overrides.items():
        (round_fields if name in RoundConfig.model_fields else settings)[name] = value
    return {**settings, "round": RoundConfig(**round_fields)}


def make_sim(**overrides: Any):
    from shared.lab.sim import SimConfig, Simulation

    return Simulation(SimConfig(**sim_settings(**overrides)))


def coordinator_algorithm(sim) -> FedARAStrategy:
    return sim.coordinator.strategy_for(sim.request())


def half_masks(sim) -> dict[str, list[int]]:
    """Even triplets of every module, none of the PRUNED ones (one per tier)."""
    modules = sorted({k.rsplit(".", 1)[0] for t in sim.coordinator.global_state.values() for k in t if ".lora_" in k})
    return {m: ([] if m in PRUNED else [0, 2, 4, 6]) for m in modules}


def start_update_bytes(sim) -> int:
    total = 0
    for link in sim.user_links + sim.edge_links:
        by = link.stats.snapshot()["by_endpoint"]
        total += sum(sum(by.get(e, [0, 0, 0])[:2]) for e in ("start", "update"))
    return total


# --- through the runtime: masks on every tier, untouched masked triplets, fewer bytes ---------------------------


@pytest.fixture(scope="module")
def masked_round(hermetic_cache) -> dict[str, Any]:
    """One round with half the triplets of every module masked and one module per tier pruned, and one without."""
    full = make_sim()
    full.run_round()
    sim = make_sim()
    algorithm = coordinator_algorithm(sim)
    masks = half_masks(sim)
    algorithm.active = {m: list(v) for m, v in masks.items()}
    before = {t: {k: v.clone() for k, v in s.items()} for t, s in sim.coordinator.global_state.items()}
    built: list[tuple[str, str, dict[str, torch.Tensor]]] = []
    packed: list[tuple[str, dict[str, torch.Tensor]]] = []
    original_build, original_pack = FedARASession.build_adapters, FedARASession.pack_update

    def build(self, state):
        params = original_build(self, state)
        built.append((self.ctx.tier, self.plan.mode, {k: p.detach().clone() for k, p in params.items()}))
        return params

    def pack(self, params):
        out = original_pack(self, params)
        packed.append((self.ctx.tier, {k: v.clone() for k, v in out.items()}))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(FedARASession, "build_adapters", build)
    mp.setattr(FedARASession, "pack_update", pack)
    try:
        row = sim.run_round()
    finally:
        mp.undo()
    return {"sim": sim, "full": full, "masks": masks, "before": before, "built": built, "packed": packed, "row": row}


def test_masked_triplets_are_absent_from_the_sessions_on_every_tier(masked_round) -> None:
    masks, before = masked_round["masks"], masked_round["before"]
    built = masked_round["built"]
    assert {(t, m) for t, m, _ in built} == {(t, m) for t in ("user", "edge", "cloud") for m in ("train", "eval")}
    for tier, mode, params in built:
        modules = {k.rsplit(".", 1)[0] for k in params if ".lora_" in k}
        assert modules == {m for m in masks if m.startswith(tuple(f"blocks.{i}." for i in
                                                             {"user": [0], "edge": [1, 2], "cloud": [3]}[tier]))} - set(PRUNED)
        for module in modules:
            idx = masks[module]
            assert params[module + ".lora_A"].shape[0] == params[module + ".lora_E"].shape[0] == len(idx)
            assert params[module + ".lora_B"].shape[1] == len(idx)
            if mode == "train":  # the replica starts from the global values of the active triplets
                assert torch.equal(params[module + ".lora_A"], before[tier][module + ".lora_A"][idx])
        if tier == "cloud":
            assert "head.classifier.weight" in params


def test_masked_triplets_keep_their_global_values_and_active_ones_train(masked_round) -> None:
    masks, before = masked_round["masks"], masked_round["before"]
    after = masked_round["sim"].coordinator.global_state
    for tier, state in after.items():
        assert set(state) == set(before[tier]) and all(state[k].shape == before[tier][k].shape for k in state)
        for key, value in state.items():
            if ".lora_" not in key:
                continue
            module, kind = key.rsplit(".", 1)
            idx = masks[module]
            masked = [i for i in range(8) if i not in idx]
            dim = 1 if kind == "lora_B" else 0
            assert torch.equal(value.index_select(dim, torch.tensor(masked)),
                               before[tier][key].index_select(dim, torch.tensor(masked))), key
            if idx and kind == "lora_E":
                assert not torch.equal(value[idx], before[tier][key][idx]), key
    exported = masked_state(after["edge"], masks)  # the model FedARA trains, for export: masked e set to zero
    key = "blocks.1.attention.self.query.lora_E"
    assert exported[key][[1, 3, 5, 7]].abs().sum() == 0 and torch.equal(exported[key][[0, 2]], after["edge"][key][[0, 2]])


def test_updates_are_compact_and_a_half_masked_round_moves_clearly_fewer_bytes(masked_round) -> None:
    masks = masked_round["masks"]
    for tier, update in masked_round["packed"]:
        for key, value in update.items():
            if ".lora_" in key or key.endswith((INDEX, SCORE)):
                module = key.rsplit(".", 1)[0]
                k = len(masks[module])
                assert k > 0 and module not in PRUNED
                assert value.shape[1 if key.endswith(".lora_B") else 0] == k, key
    masked, full = start_update_bytes(masked_round["sim"]), start_update_bytes(masked_round["full"])
    assert masked < 0.7 * full, (masked, full)


def test_rounds_shrink_the_budget_and_prune_modules_end_to_end(hermetic_cache) -> None:
    sim = make_sim(rounds=3, config={"total_rounds": 3, "warmup_rounds": 1, "final_rounds": 1,
                                     "target_rank": 0.5})
    moved = []
    for _ in range(3):
        before = start_update_bytes(sim)
        assert sim.run_round()["eval_accuracy"] is not None
        moved.append(start_update_bytes(sim) - before)
    history = coordinator_algorithm(sim).history
    # per tier: user 2 modules x 8 -> 1 + 15 / 8 -> 1, edge 4 x 8 -> 2 + 30 / 8 -> 2; the cloud's 2 x 8 are not budgeted
    assert [h["budget"] for h in history] == [{"user": 3, "edge": 6}, {"user": 1, "edge": 2}, {"user": 1, "edge": 2}]
    assert [h["active_by_tier"] for h in history] == [{"user": 3, "edge": 6, "cloud": 16}] + \
        [{"user": 1, "edge": 2, "cloud": 16}] * 2
    assert len(history[-1]["pruned_modules"]) >= 3  # at least one of the user's 2 modules, two of the edge's 4
    assert moved[0] > moved[1] > moved[2]  # adapter traffic follows the budget


def test_a_lora_deployment_refuses_fedara_with_a_clear_error(hermetic_cache) -> None:
    """Refused when the round is submitted (a 422 over the round API), before anything runs."""
    from shared.errors import InvalidInput

    sim = make_sim(adapter="lora")
    with pytest.raises(InvalidInput, match="fedara trains truncated-SVD adapters.*--adapter svd"):
        sim.run_round()
    assert sim.coordinator.version == 0 and not sim.coordinator.rounds


def test_the_cli_runs_fedara(hermetic_cache, capsys) -> None:
    from shared.lab.cli import build_parser

    args = build_parser().parse_args([
        "sim", "--model", "tiny-bert", "--data", "trec", "--users", "2", "--edges", "1", "--rounds", "1",
        "--split", "1,3", "--local-steps", "1", "--batch-size", "2", "--max-len", "16", "--max-examples", "4",
        "--eval-examples", "2", "--adapter", "svd", "--algorithm", "fedara",
        "--algorithm-config", '{"total_rounds": 2, "warmup_rounds": 1, "final_rounds": 1}'])
    assert args.func(args) == 0
    assert "acc" in capsys.readouterr().out


def test_the_benchmark_writes_its_report_and_plot(hermetic_cache, tmp_path) -> None:
    from shared.lab.bench.fedara import main

    out, png = tmp_path / "fedara.json", tmp_path / "fedara.png"
    assert main(["--quick", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert set(report["settings"]) == {"whole", "split"}
    for setting, entry in report["settings"].items():
        assert list(entry["methods"]) == ["lora", "fedara"]
        for method in entry["methods"].values():
            assert {"mean", "se", "values"} <= set(method["mean_last3_accuracy"])
            run = method["runs"][0]
            assert [r["round"] for r in run["rounds"]] == [1, 2, 3] and run["adapter_bytes"] > 0
            assert run["rounds"][-1]["cumulative_adapter_bytes"] == run["adapter_bytes"]
        assert {"bytes_ratio", "last3_accuracy_delta_points", "target_met"} <= set(entry)
    whole = report["settings"]["whole"]["methods"]["fedara"]["runs"][0]
    assert whole["split"] == [4, 4] and set(whole["rounds"][-1]["next"]["active_by_tier"]) == {"user"}
    assert png.stat().st_size > 0
