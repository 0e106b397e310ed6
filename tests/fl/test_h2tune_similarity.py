"""H2Tune's relation-guided alignment by representation similarity (``shared.fl.probe``) and its per-client
sparsity: CKA's invariances, the monotone matching, alignment maps for different depths, the probe on a real
(tiny) model, and each client's s_i."""

from __future__ import annotations

import pytest
import torch
from plans import make_plan

from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl import SessionContext, get_algorithm
from shared.fl.alignment import module_orders, slot_of, top_entries
from shared.fl.probe import (
    PROBE,
    cka,
    gram,
    monotone_match,
    probe_grams,
    similarity_map,
)
from shared.lab.sim import SimConfig, Simulation
from shared.model.adapters import LoraSettings
from shared.protocol.enums import Tier

H2 = get_algorithm("h2tune")


def reps(seed: int, n: int = 16, d: int = 6) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_compares_widths_and_ignores_rotation_scale_and_offset() -> None:
    x = reps(0)
    q, _ = torch.linalg.qr(reps(1, 6, 6))
    wider = torch.cat([3.0 * x @ q + 7.0, torch.zeros(16, 4, dtype=torch.float64)], dim=1)  # width 10
    assert gram(wider).shape == (16, 16)
    assert cka(gram(x), gram(wider)) == pytest.approx(1.0)
    assert cka(gram(x), gram(reps(2))) < 0.3  # unrelated representations
    assert cka(gram(x), torch.zeros(16, 16)) == 0.0
    # wider than the probe is long: unrelated representations stay near 0 (plain linear CKA gives about 0.9 here)
    assert abs(cka(gram(reps(3, 32, 500)), gram(reps(4, 32, 500)))) < 0.2


def test_the_matching_is_monotone_and_maximises_the_total_similarity() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8], [0.1, 0.9, 0.2], [0.0, 0.1, 0.9]])
    # row by row the best columns would be 0, 2, 1, 2 (not monotone); the best monotone total is 0, 1, 1, 2
    # (0.9 + 0.3 + 0.9 + 0.9 = 3.0, against 2.8 for 0, 2, 2, 2)
    assert monotone_match(sim) == [0, 1, 1, 2]
    assert monotone_match(torch.eye(3)) == [0, 1, 2]
    assert monotone_match(torch.tensor([[0.1, 0.9]])) == [1]


def test_similarity_maps_layers_of_different_depths_where_their_representations_match() -> None:
    """Reference a (2 blocks) and b (4 blocks, another width): b's first three blocks represent like a's first
    and its last like a's second. Relative depth would pair b's blocks 0, 1 / 2, 3; similarity pairs 0, 1, 2 / 3."""
    ra, rb = reps(10), reps(11)
    a = [gram(ra), gram(rb)]
    q, _ = torch.linalg.qr(reps(12, 6, 6))
    b = [gram(torch.cat([ra @ q * s, reps(20 + s, 16, 2) * 0.05], dim=1)) for s in (1, 2, 3)]
    b.append(gram(torch.cat([rb * 2, reps(30, 16, 2) * 0.05], dim=1)))
    mapped = similarity_map({"b/": b, "a/": a})
    assert mapped == {"a/": [0, 1], "b/": [0, 0, 0, 1]}
    order = module_orders(["b/blocks.0.attn.q"], "b/")
    by_similarity = [slot_of(f"b/blocks.{i}.attn.q", "b/", 4, 2, order, (mapped["b/"], 2))[0] for i in range(4)]
    by_depth = [slot_of(f"b/blocks.{i}.attn.q", "b/", 4, 2, order)[0] for i in range(4)]
    assert by_similarity == [0, 0, 0, 1] and by_depth == [0, 0, 1, 1]
    # more slots than the reference has blocks: a matched block's relative depth picks among them
    assert [slot_of(f"b/blocks.{i}.attn.q", "b/", 4, 4, order, (mapped["b/"], 2))[0] for i in range(4)] == [1, 1, 1, 3]


def test_the_probe_summarises_every_block_of_a_real_model(tiny) -> None:
    grams = probe_grams(tiny("tiny-llama"))
    assert len(grams) == 4 and all(g.shape == (len(PROBE), len(PROBE)) for g in grams)
    assert all(torch.allclose(g, g.T) for g in grams)
    assert cka(grams[0], grams[0]) == pytest.approx(1.0)
    assert probe_grams(tiny("tiny-llama")) is grams  # once per model and process


def test_a_mixed_federation_aligns_by_similarity_in_the_simulator(hermetic_cache) -> None:
    sim = Simulation(SimConfig(model="tiny-bert", data="trec", users=2, edges=1, rounds=2, max_len=24,
                               max_examples_per_client=8, eval_examples_per_client=4, baseline_eval=False,
                               user_models=["tiny-bert", "tiny-llama"], user_data=["trec", "sentiment"],
                               ranks=[4, 8], lora=LoraSettings(rank=4), splits={"tiny-bert": (1, 3), "tiny-llama": (1, 3)},
                               round=RoundConfig(local_steps=1, batch_size=2, algorithm="h2tune",
                                                 config={"alignment": "similarity"})))
    sim.run()
    shared = [k for t in sim.coordinator.global_state.values() for k in t if k.endswith(".h2_m")]
    assert any(k.startswith("tiny-bert/") for k in shared) and any(k.startswith("tiny-llama/") for k in shared)


def test_unknown_alignments_and_sparsity_rules_are_refused() -> None:
    with pytest.raises(InvalidInput, match="use one of depth, similarity"):
        H2.parse_config({"alignment": "cosine"})
    with pytest.raises(InvalidInput, match="use one of rank, uniform"):
        H2.parse_config({"sparsity": "bandwidth"})


@pytest.mark.parametrize("rank, sparsity, kept", [(4, "rank", 8), (2, "rank", 1), (2, "uniform", 2), (1, "rank", 1)])
def test_each_client_keeps_exactly_its_largest_entries_at_its_own_share(rank: int, sparsity: str, kept: int) -> None:
    """keep 0.5 at the deployment's rank 4: s_i = 0.5 * r_i / 4 with the rank rule (8 of 16 entries at rank 4,
    ceil(0.25 * 4) = 1 of 4 at rank 2), 0.5 for everyone with the uniform rule."""
    shapes = {"blocks.0.q.lora_A.weight": (4, 6), "blocks.0.q.lora_B.weight": (5, 4)}
    spec = ModelSpec(model="tiny-llama", split=(1, 3), task="lm", lora=LoraSettings(rank=4))
    s = H2.session({"keep": 0.5, "sparsity": sparsity},
                   SessionContext(Tier.USER, make_plan(2, rank=rank), [0], 4, spec, shapes, {}))
    params = s.build_adapters({})
    delta = torch.randn(rank, rank, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        params["blocks.0.q.h2_shared"].add_(delta)
    out = s.pack_update(params)
    index = out["blocks.0.q.h2_index"]
    assert index.numel() == kept
    assert index.tolist() == top_entries(delta, kept / rank**2).tolist()  # exactly the largest changes
    assert set(torch.topk(delta.abs().reshape(-1), kept).indices.tolist()) == set(index.tolist())
