"""What the cloud fixes for every tier of a deployment: the model spec and how the data is partitioned."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shared.data.datasets import ClientData, Example, FederatedDataset, load_examples, load_federated
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
    u_shaped: bool = False  # labels never leave the device: the user holds the head and the loss
    tokenizer: str = ""  # --tokenizer: a directory, a bundled model or "byte"; "" = the model's own, or byte-level

    @property
    def head_tier(self) -> str:
        return "user" if self.u_shaped else "cloud"

    def to_meta(self) -> dict[str, Any]:
        return {"model": self.model, "split": list(self.split), "task": self.task, "num_labels": self.num_labels,
                "lora": self.lora.to_dict(), "base_dropout": self.base_dropout, "seed": self.seed,
                "adapter": self.adapter, "codecs": {h: dict(p) for h, p in self.codecs.items()},
                "u_shaped": self.u_shaped, "tokenizer": self.tokenizer}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "ModelSpec":
        return cls(model=meta["model"], split=tuple(meta["split"]), task=meta["task"], num_labels=meta["num_labels"],
                   lora=LoraSettings(**meta["lora"]), base_dropout=meta["base_dropout"], seed=meta["seed"],
                   adapter=meta.get("adapter", "lora"), codecs=dict(meta.get("codecs", {})),
                   u_shaped=bool(meta.get("u_shaped", False)), tokenizer=meta.get("tokenizer", ""))


@dataclass
class DataSpec:
    """One partition of a bundled data set across ``num_clients`` devices (client i lives on user i)."""

    name: str = "trec"
    num_clients: int = 4
    partition: str = "default"
    alpha: float = 0.5
    seed: int = 0
    max_examples_per_client: int | None = 256
    eval_examples_per_client: int = 32
    max_len: int = 64
    min_chars: int = 0  # join consecutive texts (of the same label, for classification) up to this many characters
    pad_to_max: bool = False  # training batches padded to max_len (fixed shapes, for benchmarks)

    def load(self) -> FederatedDataset:
        dataset = load_federated(self.name, self.num_clients, partition=self.partition, alpha=self.alpha,
                                 seed=self.seed, max_examples_per_client=self.max_examples_per_client)
        for client in dataset.clients:
            client.eval = client.eval[: self.eval_examples_per_client]
            if self.min_chars:
                client.train, client.eval = _joined(client.train, self.min_chars), _joined(client.eval, self.min_chars)
        return dataset

    def client(self, index: int) -> ClientData:
        if not 0 <= index < self.num_clients:
            raise ValueError(f"client index {index} is out of range: the data set has {self.num_clients} clients")
        return self.load().clients[index]

    def task_and_labels(self) -> tuple[str, int]:
        task, label_names, _ = load_examples(self.name)
        return task, len(label_names)

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _joined(examples: list[Example], min_chars: int) -> list[Example]:
    """Consecutive texts joined into examples of at least ``min_chars`` characters (full-length rows).

    Classification examples are joined only with examples of the same label, which they keep.
    """
    out: list[Example] = []
    open_parts: dict[int | None, list[Example]] = {}
    for e in examples:
        parts = open_parts.setdefault(e.label, [])
        parts.append(e)
        if sum(len(p.text) + 1 for p in parts) >= min_chars:
            out.append(Example(text="\n".join(p.text for p in parts), label=e.label, group=e.group))
            open_parts[e.label] = []
    out.extend(Example(text="\n".join(p.text for p in parts), label=parts[-1].label, group=parts[-1].group)
               for parts in open_parts.values() if parts)
    return out


@dataclass
class Experiment:
    spec: ModelSpec
    data: DataSpec

    def to_meta(self) -> dict[str, Any]:
        return {"spec": self.spec.to_meta(), "data": self.data.to_meta()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Experiment":
        return cls(spec=ModelSpec.from_meta(meta["spec"]), data=DataSpec(**meta["data"]))


def parse_hop_codecs(text: str | None) -> dict[str, str]:
    """``"int8"`` (activations and gradients) or ``"activations=int8,gradients=topk:ratio=0.1,uploads=fp16"``."""
    from shared.protocol.codecs import CodecPolicy

    if not text or text == "fp32":
        return {}
    if "=" not in text.split(",")[0].split(":")[0]:
        fields = {"activations": text, "gradients": text}
    else:
        fields = {}
        for part in _split_top(text):
            name, sep, spec = part.partition("=")
            if not sep:
                raise ValueError(f"codec policy '{text}': expected field=spec pairs separated by commas")
            fields[name.strip()] = spec.strip()
    return CodecPolicy.from_dict(fields).to_dict()


def _split_top(text: str) -> list[str]:
    """Split on commas that start a new ``field=`` (codec params also use commas: topk:k=5,values=fp16)."""
    parts: list[str] = []
    for piece in text.split(","):
        head = piece.split("=")[0].strip()
        if parts and head not in ("activations", "gradients", "uploads", "downloads"):
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return parts


def codecs_for(user_edge: str | None, edge_cloud: str | None) -> dict[str, dict[str, str]]:
    out = {}
    for hop, text in (("user_edge", user_edge), ("edge_cloud", edge_cloud)):
        policy = parse_hop_codecs(text)
        if policy:
            out[hop] = policy
    return out
