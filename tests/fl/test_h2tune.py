"""H2Tune (``shared.fl.h2tune``, ``shared.fl.alignment``): middle matrices across hidden sizes and ranks, the
alignment of different depths, sparsification, the alternating phases, what leaves a device, and a mixed
federation of two models and three tasks in the simulator."""

from __future__ import annotations

import pytest
import torch
from plans import make_plan

from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl import SessionContext, StrategyContext, get_algorithm
from shared.fl.aggregation import AdapterUpdate
from shared.fl.alignment import (
    check_upload,
    module_orders,
    slot_of,
    sparse,
    top_entries,
)
from shared.fl.plugin import ModelInfo
from shared.lab.sim import SimConfig, Simulation
from shared.model.adapters import LoraSettings
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier

H2 = get_algorithm("h2tune")


def session(round_id: int, rank: int | None = None, keep: float = 0.25, width: tuple[int, int] = (6, 5),
            full: int = 4, store: dict | None = None):
    k, d = width
    shapes = {"blocks.0.q.lora_A.weight": (full, k), "blocks.0.q.lora_B.weight": (d, full)}
    spec = ModelSpec(model="tiny-llama", split=(1, 3), task="lm", lora=LoraSettings(rank=full))
    ctx = SessionContext(Tier.USER, make_plan(round_id, rank=rank), [0], 4, spec, shapes,
                         store if store is not None else {})
    return H2.session({"keep": keep}, ctx)


def test_sparsification_keeps_exactly_the_largest_entries() -> None:
    delta = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3], [0.05, 1.0, -2.0]])
    assert top_entries(delta, 4 / 9).tolist() == [1, 3, 7, 8]  # |-5|, |3|, |-2|, |1|
    assert top_entries(delta, 0.01).tolist() == [1]  # at least one
    start = torch.zeros(3, 3)
    up = sparse(delta + 10, start + 10, 2 / 9, "blocks.0.q")
    assert up["blocks.0.q.h2_index"].tolist() == [1, 3] and up["blocks.0.q.h2_rank"].tolist() == [3]
    assert up["blocks.0.q.h2_value"].tolist() == [5.0, 13.0]  # M's values where it changed most


@pytest.mark.parametrize("rank, width", [(None, (6, 5)), (2, (6, 5)), (3, (10, 12))])
def test_dimensions_follow_the_users_rank_and_the_models_width(rank: int | None, width: tuple[int, int]) -> None:
    s = session(2, rank=rank, width=width)
    params = s.build_adapters({})
    r = rank or 4
    assert params["blocks.0.q.lora_A.weight"].shape == (r, width[0])
    assert params["blocks.0.q.lora_B.weight"].shape == (width[1], r)
    assert torch.equal(params["blocks.0.q.h2_shared"].detach(), torch.eye(r))  # first round: the identity
    assert not params["blocks.0.q.h2_task"].any()
    bound = s.bound(params)
    assert bound["blocks.0.q.lora_A.weight"].shape == (r, width[0]) and "blocks.0.q.h2_shared" not in bound
    # a downloaded shared matrix at the deployment's rank is cut to the user's
    m = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(session(2, rank=rank, width=width).build_adapters({"blocks.0.q.h2_m": m})
                       ["blocks.0.q.h2_shared"].detach(), m[:r, :r])


@pytest.mark.parametrize("round_id, trains, frozen", [(1, "h2_task", "h2_shared"), (2, "h2_shared", "h2_task"),
                                                      (3, "h2_task", "h2_shared")])
def test_alternating_phases_freeze_the_right_part(round_id: int, trains: str, frozen: str) -> None:
    s = session(round_id)
    params = s.build_adapters({})
    loss = s.bound(params)["blocks.0.q.lora_A.weight"].pow(2).sum() + params["blocks.0.q.lora_B.weight"].sum()
    loss.backward()
    s.after_backward(params)
    assert params[f"blocks.0.q.{trains}"].grad is not None and params[f"blocks.0.q.{frozen}"].grad is None
    assert params["blocks.0.q.lora_A.weight"].grad is not None  # A and B train in both phases


def test_only_the_sparsified_shared_part_leaves_a_device_and_the_private_parts_stay() -> None:
    store: dict = {}
    for round_id in (1, 2):
        s = session(round_id, keep=0.25, store=store)
        params = s.build_adapters({})
        with torch.no_grad():
            for p in params.values():
                p.add_(0.1 * torch.randn_like(p))
        out = s.pack_update(params)
        if round_id == 1:  # task phase: nothing of M leaves
            assert out == {}
        else:
            assert sorted(out) == ["blocks.0.q.h2_index", "blocks.0.q.h2_rank", "blocks.0.q.h2_value"]
            assert out["blocks.0.q.h2_index"].numel() == 4  # a quarter of 4 x 4
        private = store["private"]["u"]
        assert sorted(private) == ["blocks.0.q.h2_task", "blocks.0.q.lora_A.weight", "blocks.0.q.lora_B.weight"]
        assert torch.equal(private["blocks.0.q.lora_A.weight"], params["blocks.0.q.lora_A.weight"].detach())
    assert torch.equal(session(3, store=store).build_adapters({})["blocks.0.q.h2_task"].detach(),
                       store["private"]["u"]["blocks.0.q.h2_task"])  # the next round resumes the private parts


def test_alignment_maps_layers_of_different_depths_to_shared_slots() -> None:
    order = module_orders(["a/blocks.0.attn.q", "a/blocks.0.attn.v", "b/blocks.0.self.query"], "a/")
    assert order == {"attn.q": 0, "attn.v": 1}
    four = [slot_of(f"a/blocks.{b}.attn.v", "a/", 4, 2, order) for b in range(4)]
    two = [slot_of(f"blocks.{b}.attn.q", "", 2, 2, order) for b in range(2)]
    assert four == [(0, 1), (0, 1), (1, 1), (1, 1)] and two == [(0, 0), (1, 0)]
    six = [slot_of(f"blocks.{b}.attn.q", "", 6, 4, order)[0] for b in range(6)]
    assert six == [0, 1, 1, 2, 3, 3]  # relative depth (b + 1/2) / 6, four slots


def test_the_cloud_averages_aligned_middle_matrices_across_ranks_and_models() -> None:
    """Deployment a (4 blocks, rank 4, width 6) and b (2 blocks, rank 2, width 10): block 3 of a and block 1 of
    b share slot 1; each entry is the weighted mean over the clients that sent it."""
    models = {"a": ModelInfo(ModelSpec("x", (1, 3), "cls", lora=LoraSettings(rank=4)), 4, "a/"),
              "b": ModelInfo(ModelSpec("y", (1, 1), "cls", lora=LoraSettings(rank=2)), 2, "b/")}
    strategy = H2.strategy({"slots": 2}, StrategyContext(Tier.CLOUD, models["a"].spec, 0, models))
    previous = AdapterBundle({Tier.USER: {}, Tier.EDGE: {},
                              Tier.CLOUD: {"a/blocks.3.q.lora_A.weight": torch.zeros(4, 6),
                                           "b/blocks.1.q.lora_A.weight": torch.zeros(2, 10),
                                           "a/blocks.0.q.lora_A.weight": torch.zeros(4, 6)}})
    up_a = {"a/blocks.3.q.h2_index": torch.tensor([0, 5, 15]), "a/blocks.3.q.h2_value": torch.tensor([1.0, 2.0, 3.0]),
            "a/blocks.3.q.h2_rank": torch.tensor([4])}
    up_b = {"b/blocks.1.q.h2_index": torch.tensor([0, 3]), "b/blocks.1.q.h2_value": torch.tensor([4.0, 6.0]),
            "b/blocks.1.q.h2_rank": torch.tensor([2])}
    for state in (up_a, up_b):
        strategy.validate_update(Tier.CLOUD, state, previous[Tier.CLOUD], "test")
    new = strategy.aggregate_round({Tier.CLOUD: [AdapterUpdate("u1", Tier.CLOUD, up_a, 1),
                                                 AdapterUpdate("u2", Tier.CLOUD, up_b, 3)]}, previous)[Tier.CLOUD]
    m_a, m_b = new["a/blocks.3.q.h2_m"], new["b/blocks.1.q.h2_m"]
    assert m_a.shape == (4, 4) and m_b.shape == (2, 2)
    assert m_a[0, 0] == pytest.approx((1 * 1 + 3 * 4) / 4) and m_b[0, 0] == m_a[0, 0]  # both sent entry (0, 0)
    assert m_a[1, 1] == pytest.approx((1 * 2 + 3 * 6) / 4) and m_b[1, 1] == m_a[1, 1]  # a's index 5, b's index 3
    assert m_a[3, 3] == 3.0 and m_a[2, 2] == 1.0  # only a sent (3, 3); nobody sent (2, 2): the identity stays
    assert "a/blocks.0.q.h2_m" not in new  # slot 0: nobody sent anything


def test_uploads_out_of_range_are_refused() -> None:
    bad = {"blocks.0.q.h2_index": torch.tensor([0, 16]), "blocks.0.q.h2_value": torch.tensor([1.0, 2.0]),
           "blocks.0.q.h2_rank": torch.tensor([4])}
    with pytest.raises(InvalidInput, match="distinct entries of a 4x4"):
        check_upload(bad, {}, 4, "user u")
    with pytest.raises(InvalidInput, match="unexpected adapter tensor"):
        check_upload({"blocks.0.q.lora_A.weight": torch.zeros(4, 6)}, {}, 4, "user u")


def test_a_mixed_federation_trains_with_h2tune_in_the_simulator(hermetic_cache) -> None:
    sim = Simulation(SimConfig(model="tiny-bert", data="trec", users=3, edges=1, rounds=2, max_len=24,
                               max_examples_per_client=8, eval_examples_per_client=4, baseline_eval=False,
                               user_models=["tiny-bert", "tiny-bert", "tiny-llama"], cuts=[1, 0, 2], ranks=[4, 8, 8],
                               user_data=["trec", "sms_spam", "sentiment"], lora=LoraSettings(rank=8),
                               splits={"tiny-bert": (1, 3), "tiny-llama": (1, 3)},
                               round=RoundConfig(local_steps=2, batch_size=2, algorithm="h2tune")))
    rows = sim.run()
    assert sorted(rows[-1]["tasks"]) == ["tiny-bert/sms_spam", "tiny-bert/trec", "tiny-llama/sentiment"]
    state = sim.coordinator.global_state
    shared = [k for t in state.values() for k in t if k.endswith(".h2_m")]
    assert any(k.startswith("tiny-bert/") for k in shared) and any(k.startswith("tiny-llama/") for k in shared)
    # a FedAvg round after H2Tune's: the middle matrices are H2Tune's own, neither sent nor kept
    sim.run_round(RoundConfig(local_steps=1, batch_size=2, algorithm="fedavg"))
    assert not [k for t in sim.coordinator.global_state.values() for k in t if k.endswith(".h2_m")]
