"""Sample-weighted FedAvg: by hand, hierarchical = flat, order independence, refusals."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.fl.aggregation import AdapterUpdate, AggregationError, weighted_mean
from shared.fl.fedavg import FedAvgConfig
from shared.fl.plugin import Strategy, StrategyContext
from shared.protocol.enums import Tier

FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = {"blocks.0.q.lora_A.weight": (4, 6), "blocks.0.q.lora_B.weight": (6, 4), "head.classifier.bias": (3,)}


def make_updates(samples: list[int], seed: int, tier: str = "user") -> list[AdapterUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [
        AdapterUpdate(source=f"user-{i:02d}", tier=tier,
                      state={k: torch.randn(s, generator=gen) * 3 for k, s in SHAPES.items()}, num_samples=n)
        for i, n in enumerate(samples)
    ]


def by_hand(updates: list[AdapterUpdate]) -> dict[str, torch.Tensor]:
    total = sum(u.num_samples for u in updates)
    return {k: sum(u.state[k].double() * u.num_samples for u in updates) / total for k in SHAPES}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def edge_report(edge_id: str, updates: list[AdapterUpdate]) -> AdapterUpdate:
    """What an edge sends up for its users: its round's strategy's pre-aggregate over the users' sample total."""
    strategy = Strategy(FedAvgConfig(), StrategyContext(Tier.EDGE))  # an edge makes one per round
    state = strategy.aggregate(Tier.USER, updates, updates[0].state if updates else {})
    return AdapterUpdate(edge_id, "edge", state, sum(u.num_samples for u in updates))


sample_counts = st.lists(st.integers(0, 1000), min_size=1, max_size=8).filter(lambda xs: sum(xs) > 0)


@FAST
@given(samples=sample_counts, seed=st.integers(0, 2**31 - 1))
def test_weighted_mean_is_the_sample_weighted_mean(samples: list[int], seed: int) -> None:
    updates = make_updates(samples, seed)
    result = weighted_mean(updates)
    expected = by_hand(updates)
    assert result.keys() == expected.keys()
    for k, v in result.items():
        assert v.dtype == torch.float32 and v.shape == SHAPES[k]
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6)


def test_weighted_mean_small_example() -> None:
    a = AdapterUpdate("a", "user", {"w": torch.tensor([1.0, 2.0])}, 1)
    b = AdapterUpdate("b", "user", {"w": torch.tensor([4.0, -1.0])}, 3)
    assert torch.equal(weighted_mean([a, b])["w"], torch.tensor([13 / 4, -1 / 4]))


def test_one_update_comes_back_unchanged_and_inputs_are_not_modified() -> None:
    [update] = make_updates([7], seed=1)
    before = {k: v.clone() for k, v in update.state.items()}
    assert_bit_identical(weighted_mean([update]), before)
    assert_bit_identical(update.state, before)


@FAST
@given(samples=sample_counts, seed=st.integers(0, 2**31 - 1), shuffle_seed=st.integers(0, 2**31 - 1))
def test_result_does_not_depend_on_arrival_order(samples: list[int], seed: int, shuffle_seed: int) -> None:
    updates = make_updates(samples, seed)
    shuffled = updates[:]
    random.Random(shuffle_seed).shuffle(shuffled)
    assert_bit_identical(weighted_mean(updates), weighted_mean(shuffled))


@FAST
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_hierarchical_equals_flat(data: st.DataObject, seed: int) -> None:
    samples = data.draw(st.lists(st.integers(1, 1000), min_size=1, max_size=10), label="samples")
    num_edges = data.draw(st.integers(1, len(samples)), label="edges")
    # every edge gets at least one user; the rest go anywhere
    edge_of = list(range(num_edges)) + data.draw(
        st.lists(st.integers(0, num_edges - 1), min_size=len(samples) - num_edges, max_size=len(samples) - num_edges))
    edge_of = data.draw(st.permutations(edge_of), label="assignment")
    updates = make_updates(samples, seed)
    edges = [edge_report(f"edge-{e}", [u for u, eu in zip(updates, edge_of) if eu == e]) for e in range(num_edges)]
    assert sum(e.num_samples for e in edges) == sum(samples)
    hierarchical = weighted_mean(edges)
    flat = weighted_mean(updates)
    for k in flat:
        torch.testing.assert_close(hierarchical[k], flat[k], rtol=0, atol=1e-6)


def test_edge_pre_aggregation_is_the_weighted_mean_over_the_sample_total() -> None:
    updates = make_updates([3, 5], seed=2, tier="edge")
    edge = edge_report("edge-7", updates)
    assert (edge.source, edge.tier, edge.num_samples) == ("edge-7", "edge", 8)
    assert_bit_identical(edge.state, weighted_mean(updates))


def changed(update: AdapterUpdate, drop: tuple[str, ...] = (), put: dict[str, torch.Tensor] | None = None) -> AdapterUpdate:
    """A copy of ``update`` without the keys ``drop`` and with the tensors ``put``."""
    state = {k: v for k, v in update.state.items() if k not in drop} | (put or {})
    return AdapterUpdate(update.source, update.tier, state, update.num_samples)


BIAS, LORA_A = "head.classifier.bias", "blocks.0.q.lora_A.weight"


def _refusals() -> list[tuple[str, list[AdapterUpdate], str]]:
    a, b = make_updates([2, 3], seed=3)
    return [
        ("no updates", [], "no updates"),
        ("zero samples", make_updates([0, 0, 0], seed=4), "no samples"),
        ("missing key", [a, changed(b, drop=(BIAS,))], "different adapter keys"),
        ("extra key", [a, changed(b, put={"blocks.9.x": torch.zeros(2)})], "different adapter keys"),
        ("renamed key", [changed(a, drop=(BIAS,), put={"head.score.bias": torch.zeros(3)}), b], "different adapter keys"),
        ("shape", [a, changed(b, put={BIAS: torch.zeros(4)})], r"shape \(4,\), expected \(3,\)"),
        ("transposed", [a, changed(b, put={LORA_A: torch.zeros(6, 4)})], "shape"),
    ]


@pytest.mark.parametrize("updates, message", [r[1:] for r in _refusals()], ids=[r[0] for r in _refusals()])
def test_weighted_mean_refuses(updates: list[AdapterUpdate], message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        weighted_mean(updates)


def test_edge_pre_aggregation_refuses_zero_samples() -> None:
    with pytest.raises(AggregationError, match="no samples"):
        edge_report("edge-0", make_updates([0, 0], seed=5))


def test_edge_pre_aggregation_refuses_no_updates() -> None:
    with pytest.raises(AggregationError):
        edge_report("edge-0", [])
