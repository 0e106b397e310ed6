"""Per-device cuts: what the cloud assigns a user from its declarations, what each tier then loads (only its
blocks), and how a user's replicas are divided at its cut and put back (``shared.fl.cuts``)."""

from __future__ import annotations

import re

import pytest
import torch
from tensor_reads import TensorReads

from shared.config.deployment import ModelSpec
from shared.config.placement import Declared, assign, assign_cut, device_bytes
from shared.errors import InvalidInput
from shared.fl.cuts import at_cut, restack
from shared.model.adapters import LoraSettings
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from shared.protocol.messages import RoundPlan
from shared.runtime.tier import TierRuntime

BLOCK = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.")


def spec(split: tuple[int, int] = (1, 3), rank: int = 4) -> ModelSpec:
    return ModelSpec(model="tiny-llama", split=split, task="lm", lora=LoraSettings(rank=rank))


def plan(cut: int | None, user: str = "u") -> RoundPlan:
    return RoundPlan(round_id=1, user_id=user, local_steps=1, batch_size=1, lr=1e-3, seed=0, cut=cut)


def test_a_block_count_is_bounded_by_b_and_the_deployment_cut_travels_as_none() -> None:
    s = spec((1, 3))
    assert assign_cut(Declared(max_blocks=0), s, None) == 0
    assert assign_cut(Declared(max_blocks=2), s, None) == 2
    assert assign_cut(Declared(max_blocks=99), s, None) == 3  # never past b
    assert assign_cut(Declared(), s, None) is None  # nothing declared: the deployment's a
    assert assign(Declared(max_blocks=1), s, None).cut is None  # equal to a: the default
    assert assign(Declared(max_blocks=2), s, None).cut == 2


def test_a_memory_budget_buys_whole_blocks_and_one_below_the_embeddings_is_refused(tiny) -> None:
    source, s = tiny("tiny-llama"), spec((1, 4))
    fixed, blocks = device_bytes(source, s)
    assert fixed > 0 and len(blocks) == 4 and all(b > 0 for b in blocks)
    sizes = (fixed, blocks)
    assert assign_cut(Declared(memory_budget=fixed), s, sizes) == 0
    assert assign_cut(Declared(memory_budget=fixed + blocks[0] + blocks[1]), s, sizes) == 2
    assert assign_cut(Declared(memory_budget=fixed + blocks[0] + blocks[1] - 1), s, sizes) == 1
    assert assign_cut(Declared(memory_budget=10**12, max_blocks=3), s, sizes) == 3  # the tighter declaration wins
    with pytest.raises(InvalidInput, match=f"cannot hold the embeddings of tiny-llama \\({fixed} bytes\\)"):
        assign_cut(Declared(memory_budget=fixed - 1), s, sizes)


def test_a_rank_above_the_deployments_is_refused() -> None:
    s = spec(rank=4)
    assert assign(Declared(rank=2), s, None).rank == 2
    assert assign(Declared(rank=4), s, None).rank is None
    with pytest.raises(InvalidInput, match="rank 5 is out of range"):
        assign(Declared(rank=5), s, None)


def test_each_cut_loads_only_its_blocks(tiny, monkeypatch) -> None:
    """A device at cut 2 reads blocks [0, 2); the edge holds [b, b) until users register, then [min a_u, b)."""
    source = tiny("tiny-llama")
    s = spec((1, 3))
    reads = TensorReads(monkeypatch)
    user = TierRuntime(Tier.USER, source, s, cut=2)
    assert user.partition.layer_ids == [0, 1]
    assert {int(m.group(1)) for k in reads.keys if (m := BLOCK.search(k))} == {0, 1}
    reads.keys.clear()
    edge = TierRuntime(Tier.EDGE, source, s, cut=3)
    assert edge.partition.layer_ids == [] and not [k for k in reads.keys if BLOCK.search(k)]
    edge.hold_from(2)
    assert edge.partition.layer_ids == [2]
    edge.hold_from(3)  # a higher cut: already held, nothing reloaded
    edge.hold_from(0)
    assert edge.partition.layer_ids == [0, 1, 2]
    assert {int(m.group(1)) for k in reads.keys if (m := BLOCK.search(k))} == {0, 1, 2}
    assert edge.layers_for(plan(2)) == [2] and edge.layers_for(plan(None)) == [1, 2]
    with pytest.raises(InvalidInput, match="needs"):
        TierRuntime(Tier.EDGE, source, s, cut=2).layers_for(plan(0))


def test_a_users_replicas_are_divided_at_its_cut_and_put_back_by_the_deployments() -> None:
    t = torch.zeros(1)
    previous = AdapterBundle({Tier.USER: {"blocks.0.x.lora_A": t}, Tier.EDGE: {"blocks.1.x.lora_A": t,
                                                                              "blocks.2.x.lora_A": t}})
    device, edge = at_cut(previous, 2)
    assert sorted(device) == ["blocks.0.x.lora_A", "blocks.1.x.lora_A"] and sorted(edge) == ["blocks.2.x.lora_A"]
    back = restack(device, edge, 1)
    assert sorted(back[Tier.USER]) == ["blocks.0.x.lora_A"]
    assert sorted(back[Tier.EDGE]) == ["blocks.1.x.lora_A", "blocks.2.x.lora_A"]
    device, edge = at_cut(previous, 0)
    assert device == {} and len(edge) == 3
