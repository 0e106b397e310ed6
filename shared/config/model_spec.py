"""What every tier runs: its partition with LoRA, per-session replicas and optimizers, the hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from shared.model.adapters import LoraSettings


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the architecture of the split model; identical on every tier."""

    model: str
    split: tuple[int, int]
    task: str
    num_labels: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    base_dropout: bool = False
    seed: int = 0
    adapter: str = "lora"  # "lora", or "svd" (P diag(e) Q, what FedARA trains)
    codecs: dict[str, dict[str, str]] = field(default_factory=dict, hash=False)  # hop -> CodecPolicy fields

    def to_meta(self) -> dict[str, Any]:
        return {"model": self.model, "split": list(self.split), "task": self.task, "num_labels": self.num_labels,
                "lora": self.lora.to_dict(), "base_dropout": self.base_dropout, "seed": self.seed,
                "adapter": self.adapter, "codecs": {h: dict(p) for h, p in self.codecs.items()}}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "ModelSpec":
        return cls(model=meta["model"], split=tuple(meta["split"]), task=meta["task"], num_labels=meta["num_labels"],
                   lora=LoraSettings(**meta["lora"]), base_dropout=meta["base_dropout"], seed=meta["seed"],
                   adapter=meta.get("adapter", "lora"), codecs=dict(meta.get("codecs", {})))
