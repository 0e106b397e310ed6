"""Split against unsplit: K steps through the three tiers and K steps of ordinary peft LoRA, same seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shared.config.round import RoundConfig
from shared.model.adapters import LoraSettings, peft_config, tensor_kind_of
from shared.protocol.enums import Tier
from shared.data.batching import BatchSampler
from shared.data.datasets import ClientData, Example, FederatedDataset
from shared.model.families import tier_config
from shared.model.partition import layout, normalise
from shared.model.sources import ModelSource, resolve_model
from shared.lab.sim import SimConfig, Simulation

# Real sentences of varied length, so that batches carry padding and masks matter.
VERIFY_TEXTS = (
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles.",
    "What films featured the character Popeye Doyle?",
    "How can I find a list of celebrities' real names?",
    "Ok lar... Joking wif u oni...",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "Split learning keeps the first blocks on the device.",
)


@dataclass
class VerifyResult:
    max_loss_diff: float
    max_weight_diff: float
    split_losses: list[float]
    whole_losses: list[float]
    num_adapter_tensors: int
    family: str = ""
    tokenizer: str = ""  # where the tokenizer came from (the byte-level fallback says so)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def verify_dataset(task: str) -> FederatedDataset:
    examples = [Example(text=t, label=i % 2 if task == "cls" else None) for i, t in enumerate(VERIFY_TEXTS)]
    client = ClientData(client_id="verify", train=examples, eval=examples[:2])
    return FederatedDataset(name="verify", task=task, label_names=["a", "b"] if task == "cls" else [], clients=[client])


def whole_model(source: ModelSource, task: str, num_labels: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = tier_config(source.family, source.config)
    if task == "cls":
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_pretrained(str(source.path), config=config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(source.path), config=config, dtype=torch.float32)


def verify_split(model: str, split: tuple[int, int], steps: int = 5, *, task: str | None = None,
                 lr: float = 1e-3, batch_size: int = 4, rank: int = 8, seed: int = 0, max_len: int = 48,
                 tokenizer: str = "", u_shaped: bool = False) -> VerifyResult:
    """Train ``steps`` steps split (one user, one edge, the cloud; U-shaped: the head on the user) and unsplit;
    compare losses and weights."""
    from peft import get_peft_model

    if steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {steps})")
    source = resolve_model(model)
    task = task or source.family.tasks[0]
    lora = LoraSettings(rank=rank, dropout=0.0)
    cfg = SimConfig(model=model, users=1, edges=1, rounds=1, split=split,
                    round=RoundConfig(local_steps=steps, batch_size=batch_size, lr=lr, deadline=None, evaluate=False),
                    max_len=max_len, lora=lora, seed=seed, baseline_eval=False, u_shaped=u_shaped,
                    tokenizer=tokenizer)
    sim = Simulation(cfg, source=source, dataset=verify_dataset(task))
    initial = {k: v.clone() for tier in sim.coordinator.global_state.values() for k, v in tier.items()}
    record = sim.run_record()
    if record.state != "committed":
        raise RuntimeError(f"split run failed: {record.error}")
    split_losses = list(record.metrics["users"]["user-0"]["losses"])
    trained = {k: v for tier in sim.coordinator.global_state.values() for k, v in tier.items()}

    torch.manual_seed(seed)
    base = whole_model(source, task, sim.spec.num_labels)
    modules = layout(source.family, base, task)
    whole = get_peft_model(base, peft_config(lora, source.family))
    params: dict[str, torch.nn.Parameter] = {}
    for name, p in whole.named_parameters():
        norm = normalise(name, modules)
        if norm in initial:
            p.requires_grad_(True)
            with torch.no_grad():
                p.copy_(initial[norm])
            params[norm] = p
        else:
            p.requires_grad_(False)
    if set(params) != set(initial):
        missing = sorted(set(initial) - set(params))[:3]
        extra = sorted(set(params) - set(initial))[:3]
        raise RuntimeError(f"adapter keys differ between split and whole model: missing {missing}, extra {extra}")
    whole.train()
    opt = sim.runtimes[Tier.USER].optimizer_settings.make(params, lr, {}, tensor_kind_of)
    sampler = BatchSampler(sim.tokenizer, sim.dataset.clients[0].train, task, max_len)
    whole_losses = []
    for batch in sampler.round_batches(seed, record.round_id, "user-0", steps, batch_size):
        out = whole(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        whole_losses.append(float(out.loss.detach()))
    max_loss = max(abs(a - b) for a, b in zip(split_losses, whole_losses))
    max_weight = max(float((trained[k] - params[k].detach()).abs().max()) for k in trained)
    return VerifyResult(max_loss, max_weight, split_losses, whole_losses, len(trained), source.family.name,
                        sim.tokenizer.origin)

