"""H2Tune's bookkeeping (``shared.fl.h2tune``): middle matrices on the wire, sparsified and pre-aggregated, and the
alignment of every model's layers to shared slots.

Keys (``<module>`` is an adapted layer, ``blocks.<l>.<path>``, under its deployment's prefix at the cloud):

* ``<module>.h2_m``: the shared middle matrix M (R x R, R the deployment's rank) in the global state;
* a client's upload: ``<module>.h2_index`` (int64, flat indices into its r x r matrix, r its own rank),
  ``<module>.h2_value`` (M's entries there) and ``<module>.h2_rank`` (int64 [r]);
* an edge's pre-aggregate of its users: ``<module>.h2_mean`` and ``<module>.h2_weight`` (R x R each; the
  sample weight behind every entry, 0 where nobody sent it).

Alignment: block l of a model with L blocks lies at relative depth (l + 1/2) / L; with S slots it maps to
slot floor((l + 1/2) S / L). Within a block, modules are matched by their order among the block's
adapted modules (sorted by name: query before value, q_proj before v_proj), so a slot is (depth, order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from shared.errors import InvalidInput
from shared.model.adapters import AdapterState, block_of

M, INDEX, VALUE, RANK, MEAN, WEIGHT = ".h2_m", ".h2_index", ".h2_value", ".h2_rank", ".h2_mean", ".h2_weight"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
SPARSE = (INDEX, VALUE, RANK)
WIRE = (*SPARSE, MEAN, WEIGHT)


def module_of(key: str) -> str | None:
    """The adapted module of an H2Tune key or a LoRA tensor's key; None for any other (a head's)."""
    for suffix in (*WIRE, M, A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def top_entries(delta: torch.Tensor, keep: float) -> torch.Tensor:
    """Flat indices of the ceil(keep * n) entries of largest magnitude (at least one), in ascending order."""
    flat = delta.detach().reshape(-1).abs()
    k = max(1, min(flat.numel(), math.ceil(keep * flat.numel())))
    return torch.topk(flat, k, sorted=False).indices.sort().values


def sparse(m: torch.Tensor, start: torch.Tensor, keep: float, module: str) -> AdapterState:
    """The upload of a trained middle matrix: its entries where it changed most since ``start``."""
    index = top_entries(m - start, keep)
    return {module + INDEX: index, module + VALUE: m.detach().reshape(-1)[index].clone(),
            module + RANK: torch.tensor([m.shape[0]], dtype=torch.int64)}


def dense_parts(state: AdapterState, weight: float, rank_of: Mapping[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every module's (weighted sum, weight) at its deployment's rank R (``rank_of``), from a client's sparse
    upload (``weight`` on each entry it sent) or an edge's pre-aggregate (its own weights)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        module = module_of(key)
        if module is None or not key.endswith((INDEX, MEAN)):
            continue
        big = rank_of[module]
        if key.endswith(MEAN):
            w = state[module + WEIGHT].to(torch.float32)
            out[module] = (state[key].to(torch.float32) * w, w)
            continue
        r = int(state[module + RANK][0])
        rows, cols = state[key] // r, state[key] % r
        total, w = torch.zeros(big, big), torch.zeros(big, big)
        total[rows, cols] = state[module + VALUE].to(torch.float32) * weight
        w[rows, cols] = weight
        out[module] = (total, w)
    return out


def check_upload(state: AdapterState, previous: AdapterState, max_rank: int, source: str) -> None:
    """An H2Tune upload: sparse middle matrices (indices in range, finite values), pre-aggregates of the
    deployment's rank, and otherwise only keys of ``previous`` with their shapes (a task's head)."""
    for key, value in state.items():
        module = module_of(key)
        if module is not None and key.endswith(WIRE):
            if key.endswith(RANK):
                if value.dtype != torch.int64 or value.numel() != 1 or not 1 <= int(value[0]) <= max_rank:
                    raise InvalidInput(f"{source}: {key} must be one rank in [1, {max_rank}]")
                r = int(value[0])
                index, values = state.get(module + INDEX), state.get(module + VALUE)
                if index is None or values is None or index.dtype != torch.int64 or index.dim() != 1 \
                        or values.shape != index.shape or index.numel() > r * r:
                    raise InvalidInput(f"{source}: {module} needs int64 h2_index and h2_value of one length")
                if index.numel() and (int(index.min()) < 0 or int(index.max()) >= r * r or
                                      index.unique().numel() != index.numel()):
                    raise InvalidInput(f"{source}: {module}.h2_index must be distinct entries of a {r}x{r} matrix")
            elif key.endswith((MEAN, WEIGHT)) and (value.dim() != 2 or value.shape[0] != value.shape[1]
                                                   or value.shape[0] > max_rank or module + MEAN not in state
                                                   or state[module + WEIGHT].shape != state[module + MEAN].shape):
                raise InvalidInput(f"{source}: {module} needs square h2_mean and h2_weight of a rank <= {max_rank}")
            elif key.endswith((INDEX, VALUE)) and module + RANK not in state:
                raise InvalidInput(f"{source}: {key} without {module}{RANK}")
            if key.endswith(WEIGHT) and bool((value < 0).any()):
                raise InvalidInput(f"{source}: {key} must not be negative")
        elif key not in previous or previous[key].shape != value.shape:
            raise InvalidInput(f"{source}: unexpected adapter tensor '{key[:120]}' (h2tune shares middle matrices "
                               f"and heads only)")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidInput(f"{source}: {key} holds a non-finite value")


def slot_of(module: str, prefix: str, num_layers: int, slots: int, order: Mapping[str, int],
            to_reference: tuple[Sequence[int], int] | None = None) -> tuple[int, int]:
    """The alignment slot of a module of a model with ``num_layers`` blocks (relative depth, order in its block).
    ``to_reference`` (similarity alignment): each block's matched block in a reference model, and that model's
    depth; the module then takes its matched block's slot."""
    local = module[len(prefix):]
    block = block_of(local)
    if block is None:
        raise ValueError(f"{module} is not in a block")
    path = local.split(".", 2)[2]
    if to_reference is not None:
        matched, num_layers = to_reference
        block = matched[block]
    return min(slots - 1, int((block + 0.5) * slots / num_layers)), order[path]


def module_orders(modules: Iterable[str], prefix: str) -> dict[str, int]:
    """Each module path's order within a block of the deployment under ``prefix`` (sorted names)."""
    paths = sorted({m[len(prefix):].split(".", 2)[2] for m in modules if m.startswith(prefix)})
    return {p: i for i, p in enumerate(paths)}
