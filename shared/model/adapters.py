"""LoRA adapters on a partition (peft), per-session replicas, and adapter state as plain dicts."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from shared.model.partition import Partition, head_trainable_names

AdapterState = dict[str, torch.Tensor]
ADAPTER_KINDS = ("lora", "svd")  # svd: dW = P diag(e) Q (peft's AdaLoRA layers), for FedARA


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


def peft_config(lora: LoraSettings, family_name: str, family_targets: tuple[str, ...], kind: str = "lora") -> Any:
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind '{kind}'; choose one of {', '.join(ADAPTER_KINDS)}")
    if kind == "svd":
        from peft import AdaLoraConfig

        return AdaLoraConfig(init_r=lora.rank, target_r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.targets(family_targets), fan_in_fan_out=(family_name == "gpt2"),
                             total_step=1)
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=lora.targets(family_targets), fan_in_fan_out=(family_name == "gpt2"),
    )


def inject_lora(part: Partition, lora: LoraSettings, kind: str = "lora", low_cpu_mem_usage: bool = False) -> None:
    """Attach peft LoRA (or SVD-form AdaLoRA) layers to the partition's blocks (nothing if it has no blocks)."""
    if not part.layer_ids:
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(lora, part.family.name, part.family.lora_targets, kind), part.blocks,
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

    LoRA A: uniform(+-1/sqrt(fan_in)) as peft's kaiming_uniform(a=sqrt(5)); LoRA B: zeros; a new
    classification head: normal(0, init_std) weights and zero bias. SVD form (as peft's AdaLoRA):
    P and Q normal(0, 0.02), e zeros, so dW = 0 at the start.
    """
    state: AdapterState = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if kind == "svd" and (key.endswith(".lora_A") or key.endswith(".lora_B")):
            state[key] = torch.randn(shape, generator=_key_generator(seed, key)) * 0.02
        elif key.endswith(".lora_E"):
            state[key] = torch.zeros(shape)
        elif ".lora_A." in key:
            bound = 1.0 / math.sqrt(shape[1])
            state[key] = (torch.rand(shape, generator=_key_generator(seed, key)) * 2 - 1) * bound
        elif ".lora_B." in key or key.endswith(".bias"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=_key_generator(seed, key)) * init_std
    return state


def clone_state(state: AdapterState) -> AdapterState:
    return {k: v.detach().clone() for k, v in state.items()}
