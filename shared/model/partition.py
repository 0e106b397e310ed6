"""Model partitioning: a tier's slice of the base model, loaded from only its own tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.model.sources import ModelError, ModelSource
from shared.model.families import FAMILIES, Family, tier_config

TIERS = ("user", "edge", "cloud")
TASKS = ("lm", "cls")


@dataclass(frozen=True)
class Split:
    """Split points ``a <= b``: user = embeddings + blocks [0, a), edge = [a, b), cloud = [b, L) + head."""

    a: int
    b: int
    num_layers: int

    def __post_init__(self) -> None:
        if not (0 <= self.a <= self.b <= self.num_layers):
            raise ModelError(
                f"split points a={self.a}, b={self.b} are out of range: need 0 <= a <= b <= {self.num_layers} "
                f"(the model has {self.num_layers} blocks), e.g. --split {min(1, self.num_layers)},{self.num_layers // 2}"
            )

    @classmethod
    def parse(cls, text: str, num_layers: int) -> "Split":
        try:
            a, b = (int(x) for x in text.split(","))
        except ValueError:
            raise ModelError(f"--split takes two integers 'a,b' (got '{text}'), e.g. --split 1,{num_layers // 2}") from None
        return cls(a, b, num_layers)

    def layers(self, tier: str) -> range:
        return {"user": range(0, self.a), "edge": range(self.a, self.b), "cloud": range(self.b, self.num_layers)}[tier]

    def tier_of_layer(self, layer: int) -> str:
        return "user" if layer < self.a else "edge" if layer < self.b else "cloud"
















class Partition(nn.Module):
    """One tier's slice: ``embed`` (user), ``blocks`` keyed by global block index, ``head`` (the cloud, or the
    user in a U-shaped chain: ``head_tier``).

    Parameter names are normalised (``blocks.3.self_attn.q_proj.weight``), so adapter keys are the
    same whichever tier holds a block and in the whole (unsplit) model.
    """

    def __init__(self, family: Family, config: Any, tier: str, split: Split, task: str, num_labels: int,
                 head_tier: str = "cloud") -> None:
        super().__init__()
        if tier not in TIERS:
            raise ValueError(f"unknown tier '{tier}'")
        if task not in TASKS:
            raise ModelError(f"unknown task '{task}': choose lm or cls")
        self.family, self.config, self.tier, self.split, self.task = family, config, tier, split, task
        self.num_labels = num_labels
        self.layer_ids = list(split.layers(tier))
        self.embed = family.make_embed(config) if tier == "user" else None
        self.blocks = nn.ModuleDict({str(i): family.make_block(config, i) for i in self.layer_ids})
        self.head = family.make_head(config, task, num_labels) if tier == head_tier else None
        self.aux = family.make_aux(config)

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.family.embed(self.embed, input_ids, attention_mask)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
        """Run this tier's blocks (or the subset ``layers``); masks and positions are rebuilt here."""
        run = self.layer_ids if layers is None else layers
        if not run:
            return hidden
        ctx = self.family.context(self.config, hidden, attention_mask, self.aux)
        for i in run:
            hidden = self.family.run_block(self.blocks[str(i)], hidden, ctx)
        return hidden

    def run_head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.family.head(self.head, hidden, attention_mask, self.task)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def head_trainable_names(partition: Partition) -> list[str]:
    """The new task head (classifier / score) trains fully; it is not in the checkpoint."""
    if partition.head is None or partition.task != "cls":
        return []
    return [n for n, _ in partition.named_parameters() if n.startswith(("head.classifier.", "head.score."))]


def checkpoint_index(source: ModelSource) -> dict[str, Path]:
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for file in source.weight_files():
        with safe_open(str(file), framework="pt") as f:  # reads the header only
            for key in f.keys():
                index[key] = file
    return index


def build_partition(source: ModelSource, tier: str, split: Split, task: str, num_labels: int = 0,
                    *, base_dropout: bool = False, device: str = "meta", head_tier: str = "cloud") -> Partition:
    """A partition whose parameters are on the meta device (no memory) or empty on ``device``."""
    from accelerate import init_empty_weights

    config = tier_config(source, base_dropout)
    with init_empty_weights(include_buffers=False):
        part = Partition(FAMILIES[source.family], config, tier, split, task, num_labels, head_tier)
    return part


def load_partition(source: ModelSource, tier: str, split: Split, task: str, num_labels: int = 0,
                   *, base_dropout: bool = False, seed: int = 0, head_tier: str = "cloud") -> Partition:
    """Build a tier's partition and read only its own tensors from the safetensors files.

    Tensors the checkpoint lacks (a new classification head) are initialised from ``seed``, the
    way transformers initialises them (normal(0, initializer_range), zero bias).
    """
    from safetensors import safe_open

    part = build_partition(source, tier, split, task, num_labels, base_dropout=base_dropout, head_tier=head_tier)
    index = checkpoint_index(source)
    wanted = [n for n, _ in part.named_parameters()]
    by_file: dict[Path, list[tuple[str, str]]] = {}
    missing: list[str] = []
    for name in wanted:
        for candidate in part.family.checkpoint_names(name, part.config):
            if candidate in index:
                by_file.setdefault(index[candidate], []).append((name, candidate))
                break
        else:
            missing.append(name)
    head_new = set(head_trainable_names(part))
    unexpected = [m for m in missing if m not in head_new]
    if unexpected:
        raise ModelError(f"{source.path}: checkpoint lacks {len(unexpected)} tensors of the {tier} partition, e.g. {unexpected[0]}")
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name, candidate in names:
                state[name] = f.get_tensor(candidate).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(part.config, "initializer_range", 0.02))
    params = dict(part.named_parameters())
    for name in missing:
        shape = params[name].shape
        state[name] = torch.zeros(shape) if name.endswith(".bias") else torch.randn(shape, generator=gen) * std
    part.load_state_dict(state, strict=False, assign=True)
    for p in part.parameters():
        p.requires_grad_(False)
    return part
