"""Model families: a few lines per architecture saying where its modules are and how a block is called.

A family is data, not forward code. The partition (``shared.model.partition``) builds the model's own
transformers classes on the meta device from its config, takes the modules a description names and
runs each block through the model's own module, so the numerics are transformers' own.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.errors import ModelError, first_line

TASKS = ("lm", "cls")
TASK_NAMES = {"lm": "language modelling", "cls": "classification"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ADD_A_FAMILY = "README.md, 'Adding a family'"


@dataclass(frozen=True)
class Family:
    """How to cut one architecture (``config.model_type``) into embeddings, blocks and a head.

    Module paths are attribute paths under the base model (``model.model``, ``model.transformer``,
    ``model.bert``); head modules are looked up on the task model first, then on its base model.
    """

    model_type: str
    lora_targets: tuple[str, ...] = ATTENTION  # default LoRA target modules (peft target_modules)
    # embeddings: embed[0] maps token ids to vectors, the rest run on its output in order (dropout, projection);
    # a module a config leaves out (None or absent) is skipped
    embed: tuple[str, ...] = ("embed_tokens",)
    positions: str | None = None  # learned position embeddings added to embed[0]'s output (GPT-2's wpe)
    embed_scale: str | None = None  # config attribute the embeddings are multiplied by (Granite)
    blocks: str = "layers"  # the block list (an nn.ModuleList)
    # how a block is called: hidden states first, then attention_mask= (causal: transformers' masks for this
    # config, sliding-window and per-layer-type ones included; else bidirectional), position_ids=, and
    # position_embeddings= from the rotary module (one per layer type where the model keeps one per type)
    causal: bool = True
    position_ids: bool = True
    rotary: str | None = "rotary_emb"
    rotary_per_layer_type: bool = False
    norm: str | None = "norm"  # the final norm, run by the cloud before the head
    lm_head: str | None = "lm_head"  # None: no causal-LM head (encoders)
    cls_head: tuple[str, ...] = ("score",)  # sequence classification: modules run in order
    pool_last: bool = True  # classification pools the last non-padding position before cls_head
    logits: Callable[[torch.Tensor, Any], torch.Tensor] | None = None  # what the LM forward does to logits
    fan_in_fan_out: bool = False  # the targets are transformers Conv1D (GPT-2): peft's fan_in_fan_out
    attention: str = "sdpa"  # the attention implementation every tier and the reference model use

    @property
    def name(self) -> str:
        return self.model_type

    @property
    def tasks(self) -> tuple[str, ...]:
        """``lm`` (causal LM) where it has an LM head, ``cls`` where transformers has a classification class."""
        return (("lm",) if self.lm_head else ()) + (("cls",) if self.cls_head else ())

    def require(self, task: str) -> None:
        """A one-line ModelError unless this family has a head for ``task``."""
        if task not in TASKS:
            raise ModelError(f"unknown task '{task}': choose lm or cls")
        if task not in self.tasks:
            only = self.tasks[0]
            hint = "--data shakespeare" if only == "lm" else "--data trec, sms_spam or sentiment"
            raise ModelError(f"{self.name} models support {TASK_NAMES[only]} only: use {hint}")


def decoder(model_type: str, **fields: Any) -> Family:
    """A Llama-shaped decoder: embed_tokens, layers (rotary, causal masks), norm, lm_head / score."""
    return Family(model_type, **fields)


def encoder(model_type: str, **fields: Any) -> Family:
    """A BERT-shaped encoder: embeddings, encoder.layer (bidirectional), a classification head."""
    defaults: dict[str, Any] = dict(lora_targets=("query", "value"), embed=("embeddings",), blocks="encoder.layer",
                                    causal=False, position_ids=False, rotary=None, norm=None, lm_head=None,
                                    cls_head=("classifier",), pool_last=False)
    return Family(model_type, **{**defaults, **fields})


def softcap(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """Gemma 2's final logit soft-capping: cap * tanh(logits / cap)."""
    cap = config.final_logit_softcapping
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def scale_by_logit_scale(logits: torch.Tensor, config: Any) -> torch.Tensor:
    return logits * config.logit_scale


def divide_by_logits_scaling(logits: torch.Tensor, config: Any) -> torch.Tensor:
    return logits / config.logits_scaling


LM_ONLY = ()  # cls_head of a family transformers has no sequence-classification class for
POOLER = ("pooler", "dropout", "classifier")  # BERT's classification head: pooled [CLS], dropout, linear

_CATALOGUE = (
    # decoders shaped like Llama: embed_tokens, layers, norm, rotary_emb, lm_head / score
    decoder("llama"),
    decoder("mistral"),  # sliding-window attention
    decoder("ministral"),  # sliding and full attention layers
    decoder("qwen2"),  # qkv bias, tied embeddings, sliding layers
    decoder("qwen3"),
    decoder("smollm3"),  # layers without rotary embeddings
    decoder("gemma"),  # scaled embeddings (inside its embedding module)
    decoder("gemma2", logits=softcap, attention="eager"),  # soft-capped attention runs eager only
    decoder("gemma3_text", logits=softcap, rotary_per_layer_type=True),
    decoder("vaultgemma", logits=softcap, attention="eager", cls_head=LM_ONLY),
    decoder("phi", embed=("embed_tokens", "embed_dropout"), norm="final_layernorm",
            lora_targets=("q_proj", "k_proj", "v_proj", "dense")),
    decoder("phi3", lora_targets=("qkv_proj", "o_proj")),
    decoder("olmo"),
    decoder("olmo2"),
    decoder("olmo3", rotary_per_layer_type=True),
    decoder("granite", embed_scale="embedding_multiplier", logits=divide_by_logits_scaling, cls_head=LM_ONLY),
    decoder("cohere", logits=scale_by_logit_scale, cls_head=LM_ONLY),
    decoder("cohere2", logits=scale_by_logit_scale, cls_head=LM_ONLY),
    decoder("stablelm"),
    decoder("persimmon", norm="final_layernorm", lora_targets=("query_key_value", "dense")),
    decoder("nemotron"),
    decoder("helium"),
    decoder("glm"),
    decoder("glm4"),
    decoder("exaone4"),
    decoder("ernie4_5", cls_head=LM_ONLY),
    decoder("apertus", cls_head=LM_ONLY),
    decoder("hunyuan_v1_dense"),
    decoder("seed_oss"),
    decoder("arcee"),
    decoder("gpt_neox", embed=("embed_in", "emb_dropout"), norm="final_layer_norm", lora_targets=("query_key_value",)),
    # GPT-2: learned positions, Conv1D projections
    decoder("gpt2", embed=("wte", "drop"), positions="wpe", blocks="h", rotary=None, norm="ln_f",
            lora_targets=("c_attn",), fan_in_fan_out=True),
    # encoders shaped like BERT: embeddings, encoder.layer, a classification head (classification only)
    encoder("bert", cls_head=POOLER),
    encoder("ernie", cls_head=POOLER),
    encoder("megatron-bert", norm="encoder.ln", cls_head=POOLER, attention="eager"),
    encoder("roberta"),
    encoder("xlm-roberta"),
    encoder("xlm-roberta-xl", norm="encoder.LayerNorm"),
    encoder("roberta-prelayernorm", norm="LayerNorm"),
    encoder("camembert"),
    encoder("data2vec-text"),
    encoder("electra", embed=("embeddings", "embeddings_project")),  # projected when embedding_size differs
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in _CATALOGUE}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_of(model_type: str) -> Family:
    """The family describing ``model_type``, or a one-line ModelError saying what is supported and how to add one."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelError(f"model type '{model_type}' is not described; supported: {supported()}; "
                         f"to add one, see {ADD_A_FAMILY}")
    return family


def tier_config(family: Family, config: Any, base_dropout: bool = False) -> Any:
    """The config every tier and the reference model run with: the family's attention, base dropout off by default.

    Every float setting whose name says dropout (``attention_dropout``, ``resid_pdrop``, ...) is set to 0,
    and a mixture of experts does not add its router's auxiliary loss (nothing trains the router).
    """
    config = copy.deepcopy(config)
    config._attn_implementation = family.attention
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = False
    if not base_dropout:
        for attr, value in config.to_dict().items():
            if isinstance(value, float) and re.search(r"dropout|pdrop", attr) and hasattr(config, attr):
                setattr(config, attr, 0.0)
    return config


def task_model(family: Family, config: Any, task: str, num_labels: int = 0) -> nn.Module:
    """The model's own transformers class for ``task`` (causal LM or sequence classification), built from config
    on the meta device: its parameters hold no memory, its buffers (rotary tables) are real.

    A config that fails to build is a one-line ModelError naming what it lacked.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    family.require(task)
    config = copy.deepcopy(config)
    if task == "cls":
        config.num_labels = num_labels
    auto, kind = ((AutoModelForCausalLM, "causal-LM") if task == "lm"
                  else (AutoModelForSequenceClassification, "sequence-classification"))
    try:
        # no weight initialisation (10x faster): the tensors are loaded, and the buffers are made in __init__
        with init_empty_weights(include_buffers=False), no_init_weights():
            return auto.from_config(config, dtype=torch.float32)
    except Exception as exc:  # anything a config makes the model's own __init__ raise
        if isinstance(exc, ValueError) and str(exc).startswith("Unrecognized configuration class"):
            raise ModelError(f"transformers has no {kind} class for model type '{family.name}'") from None
        raise ModelError(f"the config of this {family.name} model fails to build its {kind} class "
                         f"({first_line(exc)})") from None
