"""Model partitioning: a tier's slice of the base model, loaded from only its own tensors."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from shared.model.sources import ModelError, ModelSource


class Family:
    """What differs between architectures: module classes, checkpoint names, how to run a block."""

    name = ""
    lora_targets: tuple[str, ...] = ()
    dropout_attrs: tuple[str, ...] = ()
    # regexes mapping a whole-model (transformers) parameter name onto our normalised name
    hf_to_norm: tuple[tuple[str, str], ...] = ()

    def make_embed(self, config: Any) -> nn.Module:
        raise NotImplementedError

    def make_block(self, config: Any, index: int) -> nn.Module:
        raise NotImplementedError

    def make_head(self, config: Any, task: str, num_labels: int) -> nn.Module:
        raise NotImplementedError

    def embed(self, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, aux: nn.Module | None) -> dict:
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def head(self, module: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, task: str) -> torch.Tensor:
        raise NotImplementedError

    def make_aux(self, config: Any) -> nn.Module | None:
        """Weightless helpers every tier rebuilds from config (rotary embeddings)."""
        return None

    def checkpoint_names(self, norm_name: str, config: Any) -> list[str]:
        """Candidate checkpoint names of a normalised parameter name, most likely first."""
        raise NotImplementedError

    def normalise(self, hf_name: str) -> str:
        name = hf_name.replace("base_model.model.", "", 1).replace(".default", "")
        name = name.replace(".modules_to_save", "").replace(".original_module", "")
        for pattern, repl in self.hf_to_norm:
            name, n = re.subn(pattern, repl, name)
            if n:
                return name
        return name


def _last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rightmost non-padding position of each row (what transformers does for decoder classifiers)."""
    idx = torch.arange(attention_mask.shape[-1], device=hidden.device)
    last = (idx * attention_mask.to(hidden.device, torch.int64)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class LlamaFamily(Family):
    name = "llama"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout_attrs = ("attention_dropout",)
    hf_to_norm = (
        (r"^model\.layers\.(\d+)\.", r"blocks.\1."),
        (r"^model\.embed_tokens\.", "embed.embed_tokens."),
        (r"^model\.norm\.", "head.norm."),
        (r"^lm_head\.", "head.lm_head."),
        (r"^score\.", "head.score."),
    )

    def make_embed(self, config):
        module = nn.Module()
        module.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        return module

    def make_block(self, config, index):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return LlamaDecoderLayer(config, index)

    def make_head(self, config, task, num_labels):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        module = nn.Module()
        module.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if task == "lm":
            module.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            module.score = nn.Linear(config.hidden_size, num_labels, bias=False)
        return module

    def make_aux(self, config):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding(config=config)

    def embed(self, module, input_ids, attention_mask):
        return module.embed_tokens(input_ids)

    def context(self, config, hidden, attention_mask, aux):
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=attention_mask,
            past_key_values=None, position_ids=position_ids,
        )
        return {"attention_mask": mask, "position_ids": position_ids, "position_embeddings": aux(hidden, position_ids)}

    def run_block(self, block, hidden, ctx):
        return block(hidden, attention_mask=ctx["attention_mask"], position_ids=ctx["position_ids"],
                     position_embeddings=ctx["position_embeddings"])

    def head(self, module, hidden, attention_mask, task):
        hidden = module.norm(hidden)
        if task == "lm":
            return module.lm_head(hidden)
        return module.score(_last_token_pool(hidden, attention_mask))

    def checkpoint_names(self, norm_name, config):
        if norm_name.startswith("blocks."):
            return ["model.layers." + norm_name[len("blocks."):], "layers." + norm_name[len("blocks."):]]
        if norm_name.startswith("embed."):
            rest = norm_name[len("embed."):]
            return ["model." + rest, rest]
        rest = norm_name[len("head."):]
        if rest.startswith("norm."):
            return ["model." + rest, rest]
        if rest == "lm_head.weight":
            return ["lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight"]
        return [rest]


class GPT2Family(Family):
    name = "gpt2"
    lora_targets = ("c_attn",)
    dropout_attrs = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")
    hf_to_norm = (
        (r"^transformer\.h\.(\d+)\.", r"blocks.\1."),
        (r"^transformer\.(wte|wpe)\.", r"embed.\1."),
        (r"^transformer\.ln_f\.", "head.ln_f."),
        (r"^lm_head\.", "head.lm_head."),
        (r"^score\.", "head.score."),
    )

    def make_embed(self, config):
        module = nn.Module()
        module.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        module.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        module.drop = nn.Dropout(config.embd_pdrop)
        return module

    def make_block(self, config, index):
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        return GPT2Block(config, layer_idx=index)

    def make_head(self, config, task, num_labels):
        module = nn.Module()
        module.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if task == "lm":
            module.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            module.score = nn.Linear(config.hidden_size, num_labels, bias=False)
        return module

    def embed(self, module, input_ids, attention_mask):
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return module.drop(module.wte(input_ids) + module.wpe(position_ids))

    def context(self, config, hidden, attention_mask, aux):
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=attention_mask,
            past_key_values=None, position_ids=position_ids,
        )
        return {"attention_mask": mask, "position_ids": position_ids}

    def run_block(self, block, hidden, ctx):
        return block(hidden, None, ctx["attention_mask"], position_ids=ctx["position_ids"])

    def head(self, module, hidden, attention_mask, task):
        hidden = module.ln_f(hidden)
        if task == "lm":
            return module.lm_head(hidden)
        return module.score(_last_token_pool(hidden, attention_mask))

    def checkpoint_names(self, norm_name, config):
        if norm_name.startswith("blocks."):
            rest = "h." + norm_name[len("blocks."):]
        elif norm_name.startswith("embed."):
            rest = norm_name[len("embed."):]
        else:
            rest = norm_name[len("head."):]
            if rest == "lm_head.weight":
                return ["lm_head.weight", "transformer.wte.weight", "wte.weight"]
            if not rest.startswith("ln_f."):
                return [rest]
        return ["transformer." + rest, rest]


class BertFamily(Family):
    name = "bert"
    lora_targets = ("query", "value")
    dropout_attrs = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
    hf_to_norm = (
        (r"^bert\.encoder\.layer\.(\d+)\.", r"blocks.\1."),
        (r"^bert\.embeddings\.", "embed."),
        (r"^bert\.pooler\.", "head.pooler."),
        (r"^classifier\.", "head.classifier."),
    )

    def make_embed(self, config):
        from transformers.models.bert.modeling_bert import BertEmbeddings

        return BertEmbeddings(config)

    def make_block(self, config, index):
        from transformers.models.bert.modeling_bert import BertLayer

        return BertLayer(config, layer_idx=index)

    def make_head(self, config, task, num_labels):
        from transformers.models.bert.modeling_bert import BertPooler

        if task != "cls":
            raise ModelError("BERT encoders support classification only: use --data trec, sms_spam or sentiment")
        module = nn.Module()
        module.pooler = BertPooler(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        module.dropout = nn.Dropout(dropout)
        module.classifier = nn.Linear(config.hidden_size, num_labels)
        return module

    def embed(self, module, input_ids, attention_mask):
        return module(input_ids=input_ids)

    def context(self, config, hidden, attention_mask, aux):
        from transformers.masking_utils import create_bidirectional_mask

        return {"attention_mask": create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)}

    def run_block(self, block, hidden, ctx):
        return block(hidden, ctx["attention_mask"])

    def head(self, module, hidden, attention_mask, task):
        return module.classifier(module.dropout(module.pooler(hidden)))

    def checkpoint_names(self, norm_name, config):
        if norm_name.startswith("blocks."):
            rest = "encoder.layer." + norm_name[len("blocks."):]
        elif norm_name.startswith("embed."):
            rest = "embeddings." + norm_name[len("embed."):]
        else:
            rest = norm_name[len("head."):]
            if not rest.startswith("pooler."):
                return [rest]
        return [rest, "bert." + rest]


FAMILIES: dict[str, Family] = {f.name: f for f in (LlamaFamily(), GPT2Family(), BertFamily())}


def tier_config(source: ModelSource, base_dropout: bool = False) -> Any:
    """The config every tier and the reference model run with: sdpa attention, base dropout off by default."""
    config = copy.deepcopy(source.config)
    config._attn_implementation = "sdpa"
    if not base_dropout:
        for attr in FAMILIES[source.family].dropout_attrs:
            if hasattr(config, attr):
                setattr(config, attr, 0.0)
    return config
