"""Where a user trains: what it declares of itself at registration, and the placement the cloud assigns from it.

A user may declare a block count (``max_blocks``) or a memory budget in bytes (``memory_budget``),
and a LoRA rank. The cloud assigns its cut a_u (the device runs embeddings and blocks [0, a_u), the
edge [a_u, b)): the most blocks, up to the deployment's b, that both declarations allow. The budget
counts the parameter bytes the device would hold (embeddings, its blocks with their adapters at the
deployment's rank, and the head in a U-shaped chain; the frozen base is float32), not activations or
optimizer state. A budget below the embeddings' bytes is refused (422). A rank must lie in [1, the
deployment's rank] (the slots are injected at that rank; a lower one trains their first components).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.config.deployment import ModelSpec
from shared.errors import InvalidInput
from shared.model.adapters import block_of, inject_lora
from shared.model.partition import Split, build_partition
from shared.model.sources import ModelSource


MAX_NUM_SAMPLES = 2**40  # a registration's sample count: an edge's sums of them stay within msgpack's 64-bit ints


@dataclass(frozen=True)
class Declared:
    """What a user declares at registration; every field may be left out (the deployment's defaults)."""

    model: str | None = None
    data: str | None = None
    max_blocks: int | None = None
    memory_budget: int | None = None
    rank: int | None = None


@dataclass(frozen=True)
class Placement:
    """What the cloud assigned a user: its task, its cut and its rank (None: the deployment's own)."""

    data: str | None = None
    cut: int | None = None
    rank: int | None = None

    def to_meta(self) -> dict[str, Any]:
        return {"data": self.data, "cut": self.cut, "rank": self.rank}

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Placement:
        meta = meta or {}
        return cls(data=meta.get("data"), cut=meta.get("cut"), rank=meta.get("rank"))


def device_bytes(source: ModelSource, spec: ModelSpec) -> tuple[int, list[int]]:
    """Parameter bytes a device holds whatever its cut (embeddings, a U-shaped chain's head), and each block's
    among [0, b) with its adapters; from the config alone (meta tensors: nothing is loaded)."""
    b = spec.split[1]
    part = build_partition(source, "user", Split(b, b, source.num_layers), spec.task, spec.num_labels,
                           base_dropout=spec.base_dropout, head_tier=spec.head_tier)
    inject_lora(part, spec.lora, spec.adapter, low_cpu_mem_usage=True)
    fixed, blocks = 0, [0] * b
    for name, tensor in part.state_dict(keep_vars=True).items():
        size = tensor.numel() * tensor.element_size()
        block = block_of(name)
        if block is None:
            fixed += size
        else:
            blocks[block] += size
    return fixed, blocks


def assign_cut(declared: Declared, spec: ModelSpec, sizes: tuple[int, list[int]] | None) -> int | None:
    """The user's cut from its declarations (None: none declared, the deployment's a); ``sizes`` is ``device_bytes``."""
    if declared.max_blocks is None and declared.memory_budget is None:
        return None
    b = spec.split[1]
    cut = b if declared.max_blocks is None else min(b, declared.max_blocks)
    if declared.memory_budget is not None:
        fixed, blocks = sizes if sizes is not None else (0, [0] * b)
        if declared.memory_budget < fixed:
            raise InvalidInput(f"a memory budget of {declared.memory_budget} bytes cannot hold the embeddings of "
                               f"{spec.model} ({fixed} bytes); the smallest budget is {fixed} (no blocks on the device), "
                               f"{fixed + blocks[0] if blocks else fixed} for one block")
        held, total = 0, fixed
        while held < cut and total + blocks[held] <= declared.memory_budget:
            total += blocks[held]
            held += 1
        cut = held
    return cut


def assign_rank(declared: Declared, spec: ModelSpec) -> int | None:
    """The user's rank (None: the deployment's); one above the deployment's, or below 1, is refused."""
    if declared.rank is None or declared.rank == spec.lora.rank:
        return None
    if not 1 <= declared.rank <= spec.lora.rank:
        raise InvalidInput(f"rank {declared.rank} is out of range: this deployment's adapters have rank "
                           f"{spec.lora.rank}, a user may train 1 to {spec.lora.rank} of their components")
    return declared.rank


def assign(declared: Declared, spec: ModelSpec, sizes: tuple[int, list[int]] | None, data: str | None = None) -> Placement:
    """A user's placement; a cut or rank equal to the deployment's is left None (the default travels as nothing)."""
    cut = assign_cut(declared, spec, sizes)
    return Placement(data=data, cut=None if cut == spec.split[0] else cut, rank=assign_rank(declared, spec))
