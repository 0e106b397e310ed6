"""In-process simulations: per-round rows, determinism, sessions closed on every tier, failed rounds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.config.round import RoundConfig
from shared.fl import SessionPlugin, register_algorithm
from shared.fl.aggregation import AdapterUpdate, weighted_mean
from shared.lab.sim import SimConfig, Simulation
from shared.model.partition import default_split

SETTINGS = dict(users=4, edges=2, rounds=2, max_len=32, max_examples_per_client=32, eval_examples_per_client=8)
ROUND = dict(local_steps=3, batch_size=4)
CASES = {"tiny-llama/shakespeare": ("tiny-llama", "shakespeare", "eval_perplexity"),
         "tiny-bert/trec": ("tiny-bert", "trec", "eval_accuracy")}
ROW_FIELDS = {"round", "train_loss", "eval_loss", "bytes_up", "bytes_down", "seconds"}


def make(case: str, **overrides: object) -> Simulation:
    model, data, _ = CASES[case]
    round_fields = {**ROUND, **{k: v for k, v in overrides.items() if k in RoundConfig.model_fields}}
    settings = {**SETTINGS, **{k: v for k, v in overrides.items() if k not in RoundConfig.model_fields}}
    return Simulation(SimConfig(model=model, data=data, round=RoundConfig(**round_fields), **settings))


def adapters(sim: Simulation) -> dict[str, dict[str, torch.Tensor]]:
    return {t: {k: v.clone() for k, v in s.items()} for t, s in sim.coordinator.global_state.items()}


@pytest.fixture(scope="module", params=list(CASES))
def ran(request, hermetic_cache) -> tuple[str, Simulation, list[dict], dict]:
    sim = make(request.param)
    initial = adapters(sim)
    rows = sim.run()
    return request.param, sim, rows, initial


def test_rows_have_the_fields_of_the_task(ran) -> None:
    case, sim, rows, _ = ran
    quality = CASES[case][2]
    other = ({"eval_perplexity", "eval_accuracy"} - {quality}).pop()
    assert [r["round"] for r in rows] == [0, 1, 2]  # the baseline evaluation, then the rounds
    json.loads(json.dumps(rows))  # plain JSON
    for row in rows:
        assert ROW_FIELDS | {quality} <= set(row), row
        assert other not in row
        assert math.isfinite(row["eval_loss"]) and row["eval_loss"] > 0
        assert row["seconds"] > 0
    assert rows[0]["train_loss"] is None
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in rows[1:])
    if quality == "eval_perplexity":
        assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in rows)
    else:
        assert all(0 <= r["eval_accuracy"] <= 1 for r in rows)


def test_bytes_are_counted_on_both_hops(ran) -> None:
    _, _, rows, _ = ran
    for row in rows:
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        hops = row.get("bytes")
        if hops is not None:  # the per-hop split, where the row carries it
            assert row["bytes_up"] == hops["user"]["up"] + hops["edge"]["up"]
            assert row["bytes_down"] == hops["user"]["down"] + hops["edge"]["down"]
            assert all(n > 0 for hop in hops.values() for n in hop.values())
    # a training round sends activations and adapters: more than an evaluation alone
    assert rows[1]["bytes_up"] > rows[0]["bytes_up"] and rows[1]["bytes_down"] > rows[0]["bytes_down"]


def test_round_metrics_count_every_message_of_the_round(ran) -> None:
    """What the coordinator records from the edges' reports and its own ledger, as the services do, is every
    byte on each hop's links: the last update's bytes are counted before its edge reports."""
    _, sim, rows, _ = ran
    for row in rows[1:]:
        recorded = sim.coordinator.rounds[row["round"]].metrics["bytes"]
        assert recorded == {"user_edge": row["bytes"]["user"], "edge_cloud": row["bytes"]["edge"]}


def test_training_moves_the_global_adapters(ran) -> None:
    _, sim, rows, initial = ran
    assert sim.coordinator.version == 2
    after = sim.coordinator.global_state
    for tier, state in initial.items():
        assert set(after[tier]) == set(state), tier
        for key, value in state.items():
            if ".lora_B." in key:
                assert torch.count_nonzero(value) == 0 and torch.count_nonzero(after[tier][key]) > 0, key


def test_sessions_are_closed_on_every_tier_after_the_rounds(ran) -> None:
    _, sim, _, _ = ran
    for tier, runtime in sim.runtimes.items():
        assert runtime.sessions == {}, tier
    assert all(not edge.pending for edge in sim.edges)


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_gives_identical_adapters(hermetic_cache, case: str) -> None:
    small = dict(rounds=1, local_steps=2, eval_examples_per_client=2, baseline_eval=False)
    runs = []
    for _ in range(2):
        sim = make(case, **small)
        runs.append((sim.run(), adapters(sim)))
    (rows_a, state_a), (rows_b, state_b) = runs
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]
    for tier in state_a:
        assert state_a[tier].keys() == state_b[tier].keys()
        for key in state_a[tier]:
            assert torch.equal(state_a[tier][key], state_b[tier][key]), key
    other = make(case, seed=1, **small)
    other.run()
    assert any(not torch.equal(state_a[t][k], v) for t, s in adapters(other).items() for k, v in s.items())


class CaptureUpdates(SessionPlugin):
    """FedAvg that keeps a copy of every update a tier packs."""

    packed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def pack_update(self, params):
        state = super().pack_update(params)
        CaptureUpdates.packed[(self.ctx.tier, self.plan.user_id)] = {k: v.clone() for k, v in state.items()}
        return state


register_algorithm("test-capture-updates", session=CaptureUpdates)


def test_a_hierarchical_round_equals_flat_fedavg_over_the_users(small_sim) -> None:
    CaptureUpdates.packed.clear()
    sim = small_sim(users=4, edges=2, max_examples_per_client=32, algorithm="test-capture-updates")
    samples = {agent.user_id: agent.num_samples for agent in sim.users}
    assert len(set(samples.values())) > 1  # unequal weights, or the test proves little
    sim.run_round(sim.request(evaluate=False))
    for tier in ("user", "edge", "cloud"):
        flat = weighted_mean([AdapterUpdate(u, tier, CaptureUpdates.packed[(tier, u)], n) for u, n in samples.items()])
        committed = sim.coordinator.global_state[tier]
        assert flat and flat.keys() == committed.keys()
        for key, value in flat.items():
            torch.testing.assert_close(committed[key], value, rtol=0, atol=1e-6)


def test_the_wire_format_changes_nothing(small_sim) -> None:
    states = []
    for wire in (True, False):
        sim = small_sim(wire=wire)
        sim.run_round()
        states.append(adapters(sim))
    for tier in states[0]:
        for key, value in states[0][tier].items():
            assert torch.equal(value, states[1][tier][key]), key


@pytest.mark.parametrize("layers, expected", [(4, (1, 2)), (1, (1, 1)), (30, (2, 15)), (12, (1, 6))])
def test_default_split(layers: int, expected: tuple[int, int]) -> None:
    assert default_split(layers) == expected


def test_simulation_refuses_fewer_users_than_edges(hermetic_cache) -> None:
    with pytest.raises(ValueError, match="one user per edge"):
        Simulation(SimConfig(users=1, edges=2))


# --- a failed round --------------------------------------------------------------------------------


class FailOnEdge(SessionPlugin):
    """Breaks every training step on the edge, after the user tier has already opened its session."""

    def after_backward(self, params):
        if self.ctx.tier == "edge":
            raise RuntimeError("injected edge failure")


register_algorithm("test-fail-on-edge", session=FailOnEdge)


def _failed_round(small_sim):
    sim = small_sim()
    before = adapters(sim)
    record = sim.run_record(sim.request(algorithm="test-fail-on-edge"))
    return sim, before, record


def test_a_failed_round_keeps_the_previous_version(small_sim) -> None:
    sim, before, record = _failed_round(small_sim)
    # every user's training broke on the edge, so no user reported and the round cannot commit
    assert record.state == "failed" and "only 0 of 2 users reported" in record.error
    assert sim.coordinator.version == 0
    for tier, state in before.items():
        assert all(torch.equal(sim.coordinator.global_state[tier][k], v) for k, v in state.items())
    assert sim.runtimes["cloud"].sessions == {}
    row = sim.run_round()  # the next round works
    assert row["round"] == 2 and sim.coordinator.version == 1


def test_a_failed_round_closes_its_sessions_on_every_tier(small_sim) -> None:
    sim, _, record = _failed_round(small_sim)
    assert record.state == "failed"
    assert {tier: list(rt.sessions) for tier, rt in sim.runtimes.items()} == {"user": [], "edge": [], "cloud": []}
    assert all(not edge.pending for edge in sim.edges)


# --- the virtual clock ------------------------------------------------------------------------------


@pytest.mark.parametrize("links", [False, True])
def test_the_virtual_clock_charges_the_blocks_each_step_runs_and_the_links(small_sim, links: bool) -> None:
    from shared.fl.droppeft import layer_ratios, skip_mask, tier_ranges

    extra = {"user_link": "wifi", "edge_link": "fiber"} if links else {}
    sim = small_sim(block_ms=10.0, slowdowns=[1.0, 4.0], local_steps=4, algorithm="droppeft",
                    config={"ratio": 0.5}, **extra)  # tiny-llama: user block 0, edge 1-2, cloud 3
    sim.run_round()
    users = sim.coordinator.rounds[1].metrics["users"]
    probs = layer_ratios(0.5, 4, 0.9)
    for user, slowdown in (("user-0", 1.0), ("user-1", 4.0)):
        m = users[user]
        assert m["clock"] == "virtual" and len(m["step_seconds"]) == 4
        compute = []
        for step in range(4):
            skipped = skip_mask(sim.config.seed, 1, user, step, probs, tier_ranges((1, 3), 4))
            compute.append(sum(0.01 * (slowdown if block < 1 else 1.0) for block in range(4) if not skipped[block]))
        account = sim.clock.account(1, user)
        assert account["user"] + account["edge"] + account["cloud"] == pytest.approx(sum(compute))
        assert m["user_compute_seconds"] == pytest.approx(account["user"]) == pytest.approx(4 * 0.01 * slowdown)  # block 0 always runs
        assert m["seconds"] == pytest.approx(sum(m["step_seconds"])) == pytest.approx(sum(account.values()))
        if links:  # the emulated seconds of each step's request and reply on both hops
            assert account["link"] > 0
            assert all(s > c for s, c in zip(m["step_seconds"], compute))
        else:
            assert account["link"] == 0 and m["step_seconds"] == pytest.approx(compute)


def test_the_virtual_clock_refuses_pipelined_micro_batches() -> None:
    with pytest.raises(ValueError, match="does not model pipelined micro-batches"):
        SimConfig(model="tiny-bert", data="trec", block_ms=10.0, round=RoundConfig(micro_batches=2, batch_size=4))
