"""Fused submodels (DevFT): each tier's share of representative layers, similarity-guided groups, differential fusion.

A stage of ``k`` layers replaces the model's ``L`` blocks by ``k`` representative layers. In the split
runtime every tier builds its own representatives from the blocks it holds, so no tier reads another
tier's weights and no group crosses a tier cut:

* **Shares** (``representative_shares``): a tier holding ``n_t`` of the ``L`` blocks gets about
  ``k * n_t / L`` representatives: at least one if it holds blocks, at most ``n_t``, in proportion by
  Sainte-Lague's divisor method, handed out one at a time so that no tier's share shrinks as stages
  grow. So a stage needs at least as many layers as there are tiers holding blocks.
* **Groups** (``contiguous_groups``): a tier's ``n`` blocks are cut into as many contiguous groups as it
  has representatives, ``s``, none longer than ``ceil(n / s)`` (as even as the share allows: the paper
  cuts 32 layers into 4 groups of 8). The similarity of two blocks is the mean, over the block's weight
  matrices, of the cosine of the two blocks' matrices (``block_similarity``). A group's first block is
  its anchor, and among those cuts the one chosen minimises the conflict within groups: the sum over
  every block of ``1 - similarity`` to its group's anchor (dynamic programming, exact). Without the
  bound, near-equal similarities (a pretrained LLM's blocks' matrices are nearly orthogonal: cosines
  within +-0.005 on smollm2-135m) let noise pick a 14-block group beside a one-block one.
* **Fusion** (``differential_fusion``): each frozen tensor of a group's representative is the anchor's
  plus ``b`` times the sum of the other blocks' differences from it, ``b = min(beta, 1 / size)``
  (``fusion_weights``). Up to ``1 / beta`` blocks (10 at the paper's ``beta`` of 0.1) that is the paper's
  rule; beyond, the anchor's weight ``1 - beta (size - 1)`` would fall below the others' (and below 0
  past ``1 / beta + 1`` blocks, the fused layer lying outside the group), so the weight stops at the
  group's mean. The weights are never negative and sum to 1. A one-block group is the block itself,
  so a stage of all ``L`` layers is exactly the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from shared.model.partition import Split

GRAM_CHUNK = 1 << 18  # elements per block and step while accumulating a Gram matrix (bounded memory)
_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def representative_shares(split: Split, layers: int) -> dict[str, int]:
    """Each tier's number of representative layers in a stage of ``layers`` (see the module doc).

    Handed out one at a time: every tier holding blocks starts with one, and each next one goes to the
    tier, not yet at its own number of blocks ``n``, with the largest ``n / (share + 1/2)`` (Sainte-Lague's
    divisor method; the deeper tier on a tie). So a larger stage's shares contain a smaller one's: as the
    stages grow, no tier ever loses a representative.
    """
    held = {tier: len(split.layers(tier)) for tier in ("user", "edge", "cloud")}
    holders = [t for t, n in held.items() if n]
    if not len(holders) <= layers <= split.num_layers:
        raise ValueError(f"a stage of {layers} layers cannot give each of the {len(holders)} tiers holding blocks "
                         f"at least one representative within the model's {split.num_layers} blocks")
    share = {t: 1 if held[t] else 0 for t in held}
    for _ in range(layers - len(holders)):
        tier = max((t for t in holders if share[t] < held[t]),
                   key=lambda t: (held[t] / (share[t] + 0.5), holders.index(t)))
        share[tier] += 1
    return share


def frozen_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's frozen base parameters by name (its adapters left out)."""
    return {name: p.detach() for name, p in block.named_parameters() if "lora_" not in name}


def block_similarity(blocks: Sequence[nn.Module]) -> torch.Tensor:
    """``(n, n)`` float64: the mean over the blocks' weight matrices of the cosine between two blocks' matrices.

    Vectors (norms, biases) are left out where a block has matrices: their cosines are near 1 between
    any two blocks and would only flatten the differences. Gram matrices are accumulated in float64 in
    chunks, so memory stays at ``n x GRAM_CHUNK`` values whatever the size of a matrix.
    """
    tensors = [frozen_tensors(b) for b in blocks]
    names = [n for n, t in tensors[0].items() if t.dim() >= 2] or list(tensors[0])
    n = len(blocks)
    total = torch.zeros(n, n, dtype=torch.float64)
    for name in names:
        flat = [t[name].reshape(-1) for t in tensors]
        gram = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, flat[0].numel(), GRAM_CHUNK):
            x = torch.stack([f[start:start + GRAM_CHUNK].to(torch.float64) for f in flat])
            gram += x @ x.T
        norms = gram.diagonal().clamp_min(1e-300).sqrt()
        total += gram / norms[:, None] / norms[None, :]
    return total / len(names)


def contiguous_groups(similarity: torch.Tensor, groups: int, max_size: int | None = None) -> list[list[int]]:
    """Cut ``0..n-1`` into ``groups`` contiguous groups of at most ``max_size`` (default: any) minimising the sum
    of ``1 - similarity`` to each anchor.

    A group's anchor is its first index. Exact dynamic programming over the cut points; ties go to the
    earliest cut, so the result is a function of the similarities alone.
    """
    n = int(similarity.shape[0])
    longest = n if max_size is None else max_size
    if not 1 <= groups <= n or groups * longest < n:
        raise ValueError(f"cannot cut {n} blocks into {groups} groups" +
                         ("" if max_size is None else f" of at most {max_size}"))
    conflict = (1.0 - similarity.to(torch.float64)).tolist()
    cost = [[0.0] * (n + 1) for _ in range(n)]  # cost[s][e]: the group [s, e) anchored at s
    for s in range(n):
        for e in range(s + 2, n + 1):
            cost[s][e] = cost[s][e - 1] + conflict[s][e - 1]
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(groups + 1)]  # best[g][e]: blocks [0, e) in g groups
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for e in range(g, n - (groups - g) + 1):
            for s in range(max(g - 1, e - longest), e):
                value = best[g - 1][s] + cost[s][e]
                if value < best[g][e] - 1e-12:
                    best[g][e], cut[g][e] = value, s
    bounds, e = [], n
    for g in range(groups, 0, -1):
        bounds.append((cut[g][e], e))
        e = cut[g][e]
    return [list(range(s, e)) for s, e in reversed(bounds)]


def tier_groups(blocks: Mapping[int, nn.Module], representatives: int) -> list[list[int]]:
    """A tier's blocks (by global index) in ``representatives`` contiguous, similarity-guided groups of at most
    ``ceil(blocks / representatives)``."""
    ids = sorted(blocks)
    if representatives == len(ids):
        return [[i] for i in ids]
    local = contiguous_groups(block_similarity([blocks[i] for i in ids]), representatives,
                              max_size=math.ceil(len(ids) / representatives))
    return [[ids[j] for j in group] for group in local]


def groups_of(anchors: Sequence[int], layer_ids: Sequence[int]) -> list[list[int]]:
    """The contiguous groups that start at ``anchors`` and cover ``layer_ids``."""
    ids, starts = sorted(layer_ids), sorted(set(anchors))
    if not ids:
        return []
    if not starts or starts[0] != ids[0] or not set(starts) <= set(ids):
        raise ValueError(f"representatives {starts} do not start the groups of blocks {ids[0]}..{ids[-1]}")
    out: list[list[int]] = []
    for i in ids:
        if i in starts:
            out.append([])
        out[-1].append(i)
    return out


def fusion_weights(size: int, beta: float) -> tuple[float, float]:
    """(the anchor's weight, each other block's) in the fusion of a group of ``size`` blocks: with
    ``b = min(beta, 1 / size)``, ``anchor + b * sum(other - anchor)`` is ``(1 - b (size - 1)) anchor + b * others``."""
    b = min(beta, 1.0 / size)
    return 1.0 - b * (size - 1), b


def differential_fusion(anchor: torch.Tensor, others: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """``anchor + b * sum(other - anchor)`` with ``b = min(beta, 1 / group size)`` (``fusion_weights``;
    accumulated in float64, returned in the anchor's dtype)."""
    a = anchor.to(torch.float64)
    b = fusion_weights(len(others) + 1, beta)[1]
    total = torch.zeros_like(a)
    for other in others:
        total += other.to(torch.float64) - a
    return (a + b * total).to(anchor.dtype)


def fused_overrides(blocks: Mapping[int, nn.Module], groups: Sequence[Sequence[int]],
                    beta: float) -> dict[str, torch.Tensor]:
    """The frozen tensors each group's anchor block runs with instead of its own, by partition name
    (``blocks.<anchor>.<tensor>``); nothing for a one-block group."""
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        if len(group) < 2:
            continue
        anchor, others = frozen_tensors(blocks[group[0]]), [frozen_tensors(blocks[i]) for i in group[1:]]
        for name, tensor in anchor.items():
            out[f"blocks.{group[0]}.{name}"] = differential_fusion(tensor, [o[name] for o in others], beta)
    return out


def split_block_key(key: str) -> tuple[int, str] | None:
    """``blocks.3.self_attn.q_proj.lora_A.weight`` -> ``(3, "self_attn.q_proj.lora_A.weight")``; None for the head."""
    m = _BLOCK_NAME.match(key)
    return (int(m.group(1)), m.group(2)) if m else None
