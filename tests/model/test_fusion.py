"""DevFT's fused submodels: tier shares, similarity-guided contiguous groups, differential fusion by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shared.config.deployment import ModelSpec
from shared.model.fusion import (block_similarity, contiguous_groups, differential_fusion, fused_overrides,
                                 fusion_weights, groups_of, representative_shares, tier_groups)
from shared.model.partition import Split
from shared.protocol.enums import Tier
from shared.runtime.tier import TierRuntime

TIER_NAMES = ("user", "edge", "cloud")


# --- differential fusion, by hand -------------------------------------------------------------------------------


def test_differential_fusion_is_the_anchor_plus_beta_times_the_sum_of_differences() -> None:
    anchor, others = torch.tensor([1.0, 2.0]), [torch.tensor([3.0, 5.0]), torch.tensor([0.0, 1.0])]
    # 1 + 0.1 * ((3 - 1) + (0 - 1)) = 1.1;  2 + 0.1 * ((5 - 2) + (1 - 2)) = 2.2
    assert torch.allclose(differential_fusion(anchor, others, 0.1), torch.tensor([1.1, 2.2]), atol=1e-7)
    assert torch.equal(differential_fusion(anchor, others, 0.0), anchor)
    assert torch.equal(differential_fusion(anchor, [], 0.1), anchor)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 64), beta=st.floats(0, 1))
def test_fusion_weights_are_a_proper_combination_for_every_group_size(size: int, beta: float) -> None:
    anchor, other = fusion_weights(size, beta)
    assert anchor >= 0 and other >= 0
    assert anchor + (size - 1) * other == pytest.approx(1.0, abs=1e-12)
    assert anchor >= other - 1e-12  # the anchor never weighs less than another block
    if size * beta <= 1:  # up to 1 / beta blocks: the paper's anchor + beta * sum of differences
        assert (anchor, other) == pytest.approx((1 - beta * (size - 1), beta))


def test_a_group_larger_than_one_over_beta_fuses_into_its_mean_within_its_range() -> None:
    torch.manual_seed(0)
    group = [torch.randn(5) for _ in range(13)]  # the edge's one group at smollm2-135m's first stage
    fused = differential_fusion(group[0], group[1:], 0.1)  # the paper's weights would give the anchor 1 - 1.2 < 0
    assert torch.allclose(fused, torch.stack(group).mean(0), atol=1e-6)
    stacked = torch.stack(group)
    assert bool((fused >= stacked.min(0).values - 1e-6).all() and (fused <= stacked.max(0).values + 1e-6).all())
    eight = group[:8]  # the paper's groups of 8 (32 layers into 4): its rule as it is
    assert torch.allclose(differential_fusion(eight[0], eight[1:], 0.1),
                          0.3 * eight[0] + 0.1 * torch.stack(eight[1:]).sum(0), atol=1e-6)


@pytest.fixture(scope="module")
def edge(tiny) -> TierRuntime:
    """tiny-llama's edge at split (0, 4): all four blocks."""
    return TierRuntime(Tier.EDGE, tiny("tiny-llama"), ModelSpec(model="tiny-llama", split=(0, 4), task="lm"))


def test_fused_overrides_of_real_blocks_against_a_hand_computation(edge: TierRuntime) -> None:
    blocks = {i: edge.partition.blocks[str(i)] for i in edge.partition.layer_ids}
    fused = fused_overrides(blocks, [[0], [1, 2, 3]], beta=0.1)
    name = "self_attn.q_proj.base_layer.weight"
    w = [blocks[i].get_submodule("self_attn.q_proj.base_layer").weight.detach().double() for i in range(4)]
    by_hand = w[1] + 0.1 * ((w[2] - w[1]) + (w[3] - w[1]))
    assert torch.allclose(fused[f"blocks.1.{name}"].double(), by_hand, atol=1e-6)
    norm = [blocks[i].input_layernorm.weight.detach().double() for i in range(4)]
    assert torch.allclose(fused["blocks.1.input_layernorm.weight"].double(),
                          norm[1] + 0.1 * (norm[2] + norm[3] - 2 * norm[1]), atol=1e-6)
    assert not any(k.startswith("blocks.0.") for k in fused)  # a one-block group runs the block itself
    assert not any("lora_" in k for k in fused)  # the adapters are never fused
    frozen = {n for n, p in blocks[1].named_parameters() if "lora_" not in n}
    assert {k.removeprefix("blocks.1.") for k in fused} == frozen  # every frozen tensor of the anchor
    assert fused_overrides(blocks, [[0], [1], [2], [3]], beta=0.1) == {}


# --- groups -----------------------------------------------------------------------------------------------------


def _conflict(sim: torch.Tensor, groups: list[list[int]]) -> float:
    return sum(float(1 - sim[g[0], j]) for g in groups for j in g[1:])


def _all_cuts(n: int, k: int, max_size: int | None = None):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        groups = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
        if max_size is None or max(map(len, groups)) <= max_size:
            yield groups


def _symmetric(values: list[float], n: int) -> torch.Tensor:
    m = torch.tensor(values, dtype=torch.float64).reshape(n, n)
    return (m + m.T) / 2


similarities = st.integers(1, 7).flatmap(lambda n: st.lists(
    st.floats(-1, 1, allow_nan=False), min_size=n * n, max_size=n * n).map(lambda v: _symmetric(v, n)))


@settings(max_examples=150, deadline=None)
@given(sim=similarities, data=st.data())
def test_groups_are_contiguous_cover_every_block_once_and_minimise_the_conflict(sim: torch.Tensor, data) -> None:
    n = sim.shape[0]
    k = data.draw(st.integers(1, n))
    groups = contiguous_groups(sim, k)
    assert len(groups) == k and all(groups)
    assert [i for g in groups for i in g] == list(range(n))  # contiguous, in order, each block once
    best = min(_conflict(sim, g) for g in _all_cuts(n, k))
    assert _conflict(sim, groups) == pytest.approx(best, abs=1e-9)  # the exact optimum
    longest = data.draw(st.integers(math.ceil(n / k), n))
    bounded = contiguous_groups(sim, k, max_size=longest)
    assert [i for g in bounded for i in g] == list(range(n)) and len(bounded) == k
    assert max(map(len, bounded)) <= longest
    assert _conflict(sim, bounded) == pytest.approx(min(_conflict(sim, g) for g in _all_cuts(n, k, longest)), abs=1e-9)


def test_groups_follow_the_similarity_structure() -> None:
    family = [0, 0, 0, 1, 1, 2, 2, 2]  # three families of alike blocks
    sim = torch.tensor([[0.9 if a == b else -0.2 for b in family] for a in family], dtype=torch.float64)
    assert contiguous_groups(sim, 3) == [[0, 1, 2], [3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="cannot cut 8 blocks into 9"):
        contiguous_groups(sim, 9)
    with pytest.raises(ValueError, match="into 3 groups of at most 2"):
        contiguous_groups(sim, 3, max_size=2)


def test_near_equal_similarities_cannot_make_one_group_swallow_the_tier() -> None:
    # a pretrained model's blocks: cosines of about 0, so noise decides; unbounded, one group takes all but one
    sim = torch.eye(15, dtype=torch.float64)
    sim[1, 2:] = sim[2:, 1] = 0.003
    assert [len(g) for g in contiguous_groups(sim, 2)] == [1, 14]
    model = {15 + i: nn.Linear(2, 2) for i in range(15)}
    assert max(len(g) for g in tier_groups(model, 2)) == 8  # ceil(15 / 2)


def test_block_similarity_is_a_mean_cosine_over_the_weight_matrices() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    b = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        b[0].weight.copy_(-a[0].weight)  # one matrix opposite, one unrelated
    sim = block_similarity([a, b])
    other = torch.nn.functional.cosine_similarity(a[1].weight.detach().reshape(-1), b[1].weight.detach().reshape(-1), dim=0)
    assert torch.allclose(sim.diagonal(), torch.ones(2, dtype=torch.float64))
    assert float(sim[0, 1]) == pytest.approx((-1.0 + float(other)) / 2, abs=1e-6)


def test_groups_of_anchors() -> None:
    assert groups_of([3, 5, 6], [3, 4, 5, 6, 7]) == [[3, 4], [5], [6, 7]]
    assert groups_of([], []) == []
    with pytest.raises(ValueError, match="do not start"):
        groups_of([4, 6], [3, 4, 5, 6])


# --- shares, and a whole model's groups ----------------------------------------------------------------------------


@pytest.mark.parametrize("split, shares", [
    ((2, 15, 30), {4: (1, 1, 2), 8: (1, 3, 4), 16: (1, 7, 8), 30: (2, 13, 15)}),  # smollm2-135m
    ((1, 3, 6), {3: (1, 1, 1), 4: (1, 1, 2), 5: (1, 2, 2), 6: (1, 2, 3)}),  # minilm-l6
    ((0, 3, 6), {2: (0, 1, 1), 4: (0, 2, 2), 6: (0, 3, 3)}),  # a device without blocks
])
def test_representative_shares_follow_each_tiers_share_of_the_model(split, shares) -> None:
    for layers, expected in shares.items():
        assert tuple(representative_shares(Split(*split), layers).values()) == expected


splits = st.integers(1, 12).flatmap(lambda n: st.tuples(st.integers(0, n), st.integers(0, n), st.just(n))).map(
    lambda t: Split(min(t[0], t[1]), max(t[0], t[1]), t[2]))


@settings(max_examples=200, deadline=None)
@given(split=splits)
def test_shares_sum_to_the_stage_stay_within_each_tier_and_never_shrink(split: Split) -> None:
    held = {t: len(split.layers(t)) for t in TIER_NAMES}
    holders = sum(1 for n in held.values() if n)
    previous = None
    for layers in range(holders, split.num_layers + 1):
        share = representative_shares(split, layers)
        assert sum(share.values()) == layers
        assert all((1 <= share[t] <= held[t]) if held[t] else share[t] == 0 for t in TIER_NAMES)
        if previous:
            assert all(share[t] >= previous[t] for t in TIER_NAMES)
        previous = share
    assert previous == held  # the full depth: every block its own representative
    for bad in (holders - 1, split.num_layers + 1):
        with pytest.raises(ValueError, match="at least one representative"):
            representative_shares(split, bad)


@settings(max_examples=60, deadline=None)
@given(split=splits, seed=st.integers(0, 2**16), data=st.data())
def test_a_models_groups_cover_every_layer_and_never_cross_a_tier_cut(split: Split, seed: int, data) -> None:
    holders = sum(1 for t in TIER_NAMES if len(split.layers(t)))
    layers = data.draw(st.integers(holders, split.num_layers))
    torch.manual_seed(seed)
    model = {i: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)) for i in range(split.num_layers)}
    groups = []
    for tier, count in representative_shares(split, layers).items():
        mine = {i: model[i] for i in split.layers(tier)}
        tier_part = tier_groups(mine, count) if mine else []
        assert len(tier_part) == count
        assert all(len(g) <= math.ceil(len(mine) / count) for g in tier_part)  # as even as the share allows
        assert all(split.tier_of_layer(i) == tier for g in tier_part for i in g)  # inside the tier's cut
        groups += tier_part
    assert len(groups) == layers
    assert [i for g in groups for i in g] == list(range(split.num_layers))  # contiguous, every layer once
