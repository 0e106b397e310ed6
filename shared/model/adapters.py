"""LoRA adapters on a partition (peft), per-session replicas, and adapter state as plain dicts."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shared.model.families import Family
from shared.model.partition import Partition, head_trainable_names
from shared.protocol.bundle import AdapterState

@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules`` empty means the family's default."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {self.rank})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")

    def targets(self, family_targets: tuple[str, ...]) -> list[str]:
        return list(self.target_modules) or list(family_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterKind:
    """A form of trainable adapter: how peft injects it, its version-0 values, the kinds of its tensors."""

    name: str
    peft_config: Callable[[LoraSettings, Family], Any]  # (settings, the model's family) -> peft config
    initial: Callable[[str, tuple[int, ...], torch.Generator], torch.Tensor | None]  # None: not this kind's tensor
    tensor_kind: Callable[[str], str | None]  # adapter key -> kind name ("lora_A", ...), None: not this kind's


_KINDS: dict[str, AdapterKind] = {}


def register_adapter_kind(kind: AdapterKind) -> AdapterKind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"adapter kind '{kind.name}' is already registered")
    _KINDS[kind.name] = kind
    return kind


def adapter_kind(name: str) -> AdapterKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown adapter kind '{name}'; choose one of {', '.join(_KINDS)}") from None


def tensor_kind_of(key: str) -> str:
    """The kind of an adapter tensor: its adapter form's name for it, ``head`` for a new task head's."""
    for kind in _KINDS.values():
        found = kind.tensor_kind(key)
        if found is not None:
            return found
    return "head" if key.startswith("head.") else "other"


def _lora_config(lora: LoraSettings, family: Family) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                      target_modules=lora.targets(family.lora_targets), fan_in_fan_out=family.fan_in_fan_out)


def _lora_initial(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor | None:
    """A: uniform(+-1/sqrt(fan_in)), as peft's kaiming_uniform(a=sqrt(5)); B: zeros, so dW = 0 at the start."""
    if ".lora_A." in key:
        bound = 1.0 / math.sqrt(shape[1])
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    if ".lora_B." in key:
        return torch.zeros(shape)
    return None


def _lora_kind(key: str) -> str | None:
    return "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None


def _svd_config(lora: LoraSettings, family: Family) -> Any:
    from peft import AdaLoraConfig

    return AdaLoraConfig(init_r=lora.rank, target_r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora.targets(family.lora_targets), fan_in_fan_out=family.fan_in_fan_out,
                         total_step=1)


def _svd_initial(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor | None:
    """P and Q: normal(0, 0.02); e: zeros, so dW = 0 at the start (peft's AdaLoRA)."""
    if key.endswith((".lora_A", ".lora_B")):
        return torch.randn(shape, generator=gen) * 0.02
    if key.endswith(".lora_E"):
        return torch.zeros(shape)
    return None


def _svd_kind(key: str) -> str | None:
    return {".lora_A": "svd_Q", ".lora_B": "svd_P", ".lora_E": "svd_e"}.get(key[key.rfind("."):]) if "." in key else None


LORA = register_adapter_kind(AdapterKind("lora", _lora_config, _lora_initial, _lora_kind))
SVD = register_adapter_kind(AdapterKind("svd", _svd_config, _svd_initial, _svd_kind))  # dW = P diag(e) Q, FedARA's


def peft_config(lora: LoraSettings, family: Family, kind: str = "lora") -> Any:
    return adapter_kind(kind).peft_config(lora, family)


def inject_lora(part: Partition, lora: LoraSettings, kind: str = "lora", low_cpu_mem_usage: bool = False) -> None:
    """Attach peft LoRA (or SVD-form AdaLoRA) layers to the partition's blocks (nothing if it has no blocks)."""
    if not part.layer_ids:
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(lora, part.family, kind), part.blocks,
                            low_cpu_mem_usage=low_cpu_mem_usage)


def _norm(name: str) -> str:
    return name.replace(".default", "")


class AdapterSlots:
    """Where each trainable tensor of a partition lives, so a session's tensors can be bound in.

    A session owns its own ``nn.Parameter`` objects; ``bind`` sets them on the modules before a
    forward pass. Autograd records the bound tensors, so after the forward the slots may be bound
    to another session while this one's backward is still to come. Tensors may be smaller than the
    slot along the rank (a plug-in's active triplets), and an adapter layer none of whose tensors a
    session holds is switched off for it (a pruned module costs no adapter compute).
    """

    def __init__(self, part: Partition) -> None:
        self.locations: dict[str, tuple[nn.Module, str]] = {}
        self.layer_of: dict[str, nn.Module] = {}
        tuner_layers = {name: m for name, m in part.named_modules() if hasattr(m, "_disable_adapters")}
        for name, module in part.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if "lora_" in full:
                    key = _norm(full)
                    self.locations[key] = (module, pname)
                    owner = full.split(".lora_")[0]
                    if owner in tuner_layers:
                        self.layer_of[key] = tuner_layers[owner]
        for full in head_trainable_names(part):
            mod_name, pname = full.rsplit(".", 1)
            self.locations[full] = (part.get_submodule(mod_name), pname)
        self.keys = sorted(self.locations)
        self.full_shapes = {k: tuple(getattr(m, p).shape) for k, (m, p) in self.locations.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The slots' full shapes (as injected; a bound session's tensors may be smaller along the rank)."""
        return dict(self.full_shapes)

    def current(self) -> AdapterState:
        return {k: getattr(m, p).detach() for k, (m, p) in self.locations.items()}

    def bind(self, params: dict[str, torch.Tensor]) -> None:
        absent: set[int] = set()
        for key, (module, pname) in self.locations.items():
            value = params.get(key)
            if value is None:
                if key not in self.layer_of:
                    raise KeyError(f"a session lacks the adapter tensor '{key}'")
                absent.add(id(self.layer_of[key]))
                continue
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            setattr(module, pname, value)
        for layer in {id(m): m for m in self.layer_of.values()}.values():
            layer._disable_adapters = id(layer) in absent


def _key_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def initial_state(shapes: dict[str, tuple[int, ...]], seed: int, init_std: float = 0.02,
                  kind: str = "lora") -> AdapterState:
    """Version-0 adapters, each tensor from its own seeded generator (independent of who makes it).

    Adapter tensors as their kind initialises them (``AdapterKind.initial``); a new classification
    head: normal(0, init_std) weights and zero bias.
    """
    form = adapter_kind(kind)
    state: AdapterState = {}
    for key in sorted(shapes):
        shape = shapes[key]
        value = form.initial(key, shape, _key_generator(seed, key))
        if value is None:
            value = torch.zeros(shape) if key.endswith(".bias") else torch.randn(shape, generator=_key_generator(seed, key)) * init_std
        state[key] = value
    return state


def clone_state(state: AdapterState) -> AdapterState:
    return {k: v.detach().clone() for k, v in state.items()}
