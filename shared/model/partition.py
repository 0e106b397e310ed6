"""Model partitioning: a tier's slice of the base model, loaded from only its own tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelError
from shared.model.families import ADD_A_FAMILY, Family, task_model, tier_config
from shared.model.mapped import StoredRowsEmbedding, map_token_embedding
from shared.model.sources import ModelSource

TIERS = ("user", "edge", "cloud")


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


def default_split(num_layers: int) -> tuple[int, int]:
    """A small user share and the middle of the model for the edge: (max(1, L // 15), L // 2)."""
    a = min(max(1, num_layers // 15), num_layers)
    return a, max(a, num_layers // 2)


def _present(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def layout(family: Family, model: nn.Module, task: str) -> dict[str, str]:
    """Normalised module name (``embed.wte``, ``blocks.3``, ``head.norm``) -> its path in the task model ``model``."""
    base = model.base_model_prefix if _present(model, model.base_model_prefix) else ""

    def in_base(path: str) -> str:
        return f"{base}.{path}" if base else path

    def head_path(path: str) -> str:
        return path if _present(model, path) else in_base(path)

    out: dict[str, str] = {}
    required = [family.embed[0], *([family.positions] if family.positions else [])]
    for path in required + [p for p in family.embed[1:] if _present(model, in_base(p))]:  # the rest: if the config has it
        out[f"embed.{path.rsplit('.', 1)[-1]}"] = in_base(path)
    for i in range(len(model.get_submodule(in_base(family.blocks)))):
        out[f"blocks.{i}"] = in_base(f"{family.blocks}.{i}")
    heads = ([in_base(family.norm)] if family.norm else []) + (
        [head_path(family.lm_head)] if task == "lm" and family.lm_head else [head_path(p) for p in family.cls_head])
    for path in heads:
        name = f"head.{path.rsplit('.', 1)[-1]}"
        if name in out:
            raise ModelError(f"family '{family.name}' names two head modules '{name}'")
        out[name] = path
    for name, path in out.items():
        if not _present(model, path):
            raise ModelError(f"family '{family.name}': the model has no module '{path}' (for {name}); see {ADD_A_FAMILY}")
    return out


def normalise(name: str, modules: dict[str, str]) -> str:
    """A whole-model (transformers or peft) parameter name as a partition names it, given ``layout``'s map."""
    name = name.replace("base_model.model.", "", 1).replace(".default", "")
    name = name.replace(".modules_to_save", "").replace(".original_module", "")
    by_path = {path: norm for norm, path in modules.items()}
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        norm = by_path.get(".".join(parts[:cut]))
        if norm is not None:
            return ".".join([norm, *parts[cut:]])
    return name


def _last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rightmost non-padding position of each row (what transformers does for decoder classifiers)."""
    idx = torch.arange(attention_mask.shape[-1], device=hidden.device)
    last = (idx * attention_mask.to(hidden.device, torch.int64)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Partition(nn.Module):
    """One tier's slice: ``embed`` (user), ``blocks`` keyed by global block index, ``head`` (the cloud, or the
    user in a U-shaped chain: ``head_tier``).

    The modules are the model's own transformers modules, taken from its task model built on the meta
    device. Parameter names are normalised (``blocks.3.self_attn.q_proj.weight``), so adapter keys are
    the same whichever tier holds a block and in the whole (unsplit) model.
    """

    def __init__(self, family: Family, model: nn.Module, tier: str, split: Split, task: str,
                 head_tier: str = "cloud") -> None:
        super().__init__()
        if tier not in TIERS:
            raise ValueError(f"unknown tier '{tier}'")
        self.family, self.config, self.tier, self.split, self.task = family, model.config, tier, split, task
        self.layer_ids = list(split.layers(tier))
        modules = layout(family, model, task)
        if (count := sum(n.startswith("blocks.") for n in modules)) != split.num_layers:
            raise ModelError(f"the config says {split.num_layers} blocks but the {family.name} model has {count}")
        mine = {"embed": tier == "user", "head": tier == head_tier}
        self.paths = {n: p for n, p in modules.items()  # normalised module name -> path in the task model
                      if mine.get(n.split(".")[0], n.startswith("blocks.") and int(n.split(".")[1]) in self.layer_ids)}
        self.head_new = [p for p in family.cls_head if task == "cls" and _present(model, p)]  # on the task model
        self.embed = nn.ModuleDict({n[6:]: model.get_submodule(p) for n, p in self.paths.items()
                                    if n.startswith("embed.")}) if tier == "user" else None
        self.blocks = nn.ModuleDict({str(i): model.get_submodule(self.paths[f"blocks.{i}"]) for i in self.layer_ids})
        self.head = nn.ModuleDict({n[5:]: model.get_submodule(p) for n, p in self.paths.items()
                                   if n.startswith("head.")}) if tier == head_tier else None
        base = getattr(model, model.base_model_prefix, model)
        self.rotary = base.get_submodule(family.rotary) if family.rotary and self.layer_ids else None

    # the three stages ---------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        f, modules = self.family, list(self.embed.values())
        hidden = modules[0](input_ids)
        if f.embed_scale:
            hidden = hidden * getattr(self.config, f.embed_scale)
        rest = modules[1:]
        if f.positions:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            hidden = hidden + rest[0](position_ids)
            rest = rest[1:]
        for module in rest:
            hidden = module(hidden)
        return hidden

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
        """Run this tier's blocks (or the subset ``layers``); masks, positions and rotary tables are rebuilt here."""
        run = self.layer_ids if layers is None else layers
        if not run:
            return hidden
        masks, kwargs, rotary = self._context(hidden, attention_mask)
        layer_types = getattr(self.config, "layer_types", None)
        for i in run:
            kind = layer_types[i] if layer_types else None
            call = dict(kwargs, attention_mask=masks[kind] if isinstance(masks, dict) else masks)
            if rotary is not None:
                call["position_embeddings"] = rotary[kind] if self.family.rotary_per_layer_type else rotary
            out = self.blocks[str(i)](hidden, **call)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[Any, dict, Any]:
        from transformers.masking_utils import create_bidirectional_mask, create_masks_for_generate

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        if self.family.causal:  # transformers' own choice of causal / sliding-window / per-layer-type masks
            masks = create_masks_for_generate(self.config, hidden, attention_mask, None, position_ids)
            if isinstance(masks, torch.Tensor) and masks is attention_mask:
                raise ModelError(f"layer types {sorted(set(self.config.layer_types))} of this {self.family.name} "
                                 "model need masks this runtime does not build")
        else:
            masks = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        kwargs = {"position_ids": position_ids} if self.family.position_ids else {}
        rotary = None
        if self.rotary is not None:
            if self.family.rotary_per_layer_type:
                rotary = {t: self.rotary(hidden, position_ids, t) for t in set(self.config.layer_types)}
            else:
                rotary = self.rotary(hidden, position_ids)
        return masks, kwargs, rotary

    def run_head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        parts = self.head_parts(hidden, attention_mask)
        return parts.to_logits(parts.features)

    def head_parts(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> HeadParts:
        """The head in two (``HeadParts``): a language model's final norm, then the projection to the vocabulary,
        which a loss may apply to a chunk of positions at a time; a classifier's whole head, then nothing."""
        f, head = self.family, dict(self.head.items())
        if f.norm:
            hidden = head.pop(f.norm.rsplit(".", 1)[-1])(hidden)
        if self.task == "lm":
            module = next(iter(head.values()))
            project: Callable[[torch.Tensor], torch.Tensor] = module
            if _frozen_linear(module):  # its tensors as bound now: the chunks may run after another session binds
                weight, bias = module.weight, module.bias
                project = lambda rows: F.linear(rows, weight, bias)  # what nn.Linear's forward runs
            to_logits = (lambda rows: f.logits(project(rows), self.config)) if f.logits else project
            return HeadParts(hidden, to_logits, tuple(p for p in module.parameters() if p.requires_grad),
                             getattr(module, "out_features", None) or self.config.vocab_size, project is not module)
        if f.pool_last:
            hidden = _last_token_pool(hidden, attention_mask)
        for module in head.values():
            hidden = module(hidden)
        return HeadParts(hidden, _same, (), hidden.shape[-1], True)

    def parameter_bytes(self) -> int:
        """Bytes of the model's tensors this tier holds: its parameters (adapters included once injected) and
        the persistent buffers a checkpoint stores (an activation's constants); not the rotary tables."""
        tensors = {id(t): t for t in self.state_dict(keep_vars=True).values()}  # a shared tensor once
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def compute_dtype(self) -> torch.dtype:
        """The dtype this tier computes in: its parameters', a token embedding kept in its stored dtype aside."""
        return next((p.dtype for m in self.modules() if not isinstance(m, StoredRowsEmbedding)
                     for p in m.parameters(recurse=False)), torch.float32)

    def checkpoint_name(self, name: str) -> str:
        """The task model's name of a normalised parameter name (``blocks.3.attn.c_attn.weight``)."""
        module, rest = ".".join(name.split(".")[:2]), ".".join(name.split(".")[2:])
        return f"{self.paths[module]}.{rest}"


@dataclass(frozen=True)
class HeadParts:
    """A head as ``to_logits(features)``. A language model's ``features`` are the final norm's output, one row per
    position, and ``to_logits`` maps any rows of them to logits (``outputs`` wide) with ``params``, the projection's
    trainable tensors (an adapter on it); a classifier's ``features`` are already its logits. ``standalone``:
    ``to_logits`` reads no module's attributes, only tensors it took when the parts were made (a frozen plain linear
    projection, the usual language-model head), so it computes the same after the modules are rebound to another
    session's tensors: a tier may run it outside its lock."""

    features: torch.Tensor
    to_logits: Callable[[torch.Tensor], torch.Tensor]
    params: tuple[torch.Tensor, ...]
    outputs: int
    standalone: bool = False


def _frozen_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (no subclass, no hooks of its own) none of whose tensors trains: ``F.linear`` on its
    weight and bias is its whole forward."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not any(p.requires_grad for p in module.parameters()))


def _same(rows: torch.Tensor) -> torch.Tensor:
    return rows


def head_trainable_names(partition: Partition) -> list[str]:
    """The new classification head (the modules the task model adds on its base model) trains fully."""
    if partition.head is None or partition.task != "cls":
        return []
    new = tuple(f"head.{p.rsplit('.', 1)[-1]}." for p in partition.head_new)
    return [n for n, _ in partition.named_parameters() if n.startswith(new)] if new else []


def checkpoint_index(source: ModelSource) -> dict[str, Path]:
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for file in source.weight_files():
        with safe_open(str(file), framework="pt") as f:  # reads the header only
            for key in f.keys():
                index[key] = file
    return index


def _build(source: ModelSource, tier: str, split: Split, task: str, num_labels: int,
           base_dropout: bool, head_tier: str = "cloud") -> tuple[nn.Module, Partition]:
    model = task_model(source.family, tier_config(source.family, source.config, base_dropout), task, num_labels)
    return model, Partition(source.family, model, tier, split, task, head_tier)


def build_partition(source: ModelSource, tier: str, split: Split, task: str, num_labels: int = 0,
                    *, base_dropout: bool = False, head_tier: str = "cloud") -> Partition:
    """A partition whose parameters are on the meta device (no memory); buffers (rotary tables) are real."""
    return _build(source, tier, split, task, num_labels, base_dropout, head_tier)[1]


def checkpoint_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Task-model parameter name -> the checkpoint key that holds it, by transformers' own key mapping.

    That mapping adds or strips the base model's prefix (a checkpoint saved from the base model, or
    from another head) and applies the model's renamings (legacy names: ``LayerNorm.gamma``, GPT-NeoX's
    ``embed_out``). A tied parameter maps to its source's key, as transformers ties after loading. Keys
    that need a weight conversion beyond renaming (fused experts) are left out.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    found: dict[str, str] = {}
    for key in keys:
        target, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converter is None and target in meta:
            found.setdefault(target, key)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if source in found:
            found[target] = found[source]
    return found


def load_partition(source: ModelSource, tier: str, split: Split, task: str, num_labels: int = 0,
                   *, base_dropout: bool = False, seed: int = 0, head_tier: str = "cloud") -> Partition:
    """Build a tier's partition and read only its own tensors from the safetensors files.

    Its own tensors are its parameters and the persistent buffers a checkpoint may hold (an activation's
    constants); a buffer the checkpoint lacks keeps the value its module computed from the config.
    Parameters the checkpoint lacks (a new classification head) are initialised from ``seed``, the way
    transformers initialises them (normal(0, initializer_range), zero bias). The frozen token embedding
    (the user's) is read through a copy-on-write memory map of its file where it can be (``shared.model.mapped``).
    """
    from safetensors import safe_open

    model, part = _build(source, tier, split, task, num_labels, base_dropout, head_tier)
    index = checkpoint_index(source)
    keys = checkpoint_keys(model, list(index))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    missing: list[str] = []
    params = dict(part.named_parameters())
    for name in part.state_dict(keep_vars=True):
        key = keys.get(part.checkpoint_name(name)) if name.split(".")[0] in ("embed", "blocks", "head") else None
        if key is not None:
            by_file.setdefault(index[key], []).append((name, key))
        elif name in params:
            missing.append(name)
    head_new = set(head_trainable_names(part))
    unexpected = [m for m in missing if m not in head_new]
    if unexpected:
        raise ModelError(f"{source.path}: checkpoint lacks {len(unexpected)} tensors of the {tier} partition, "
                         f"e.g. {part.checkpoint_name(unexpected[0])}")
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name, key in names:
                mapped = map_token_embedding(model, part, name, file, key) if name.startswith("embed.") else None
                if mapped is not None:  # the frozen token embedding: mapped, not copied (shared.model.mapped)
                    state[name] = mapped
                    continue
                tensor = f.get_tensor(key)
                state[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(part.config, "initializer_range", 0.02))
    for name in missing:
        shape = params[name].shape
        state[name] = torch.zeros(shape) if name.endswith(".bias") else torch.randn(shape, generator=gen) * std
    part.load_state_dict(state, strict=False, assign=True)
    for p in part.parameters():
        p.requires_grad_(False)
    return part
