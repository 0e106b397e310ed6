"""Tokenizers: a model directory's own files, one named with --tokenizer, or a byte-level fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import ModelError, first_line

# Files that carry a vocabulary (tokenizer_config.json alone does not), and the companions some of them need.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tiktoken.model")
COMPANIONS = {"vocab.json": ("merges.txt",)}
BYTE_MARKER = "byte_tokenizer.json"  # the tiny test models' tokenizer


class Tokenizer:
    """The small tokenizer surface the runtime needs; ``origin`` says where it came from (printed by commands)."""

    pad_id: int
    bos_id: int | None
    eos_id: int | None
    origin: str = ""

    def encode(self, text: str) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 4: 0 pad, 1 bos/cls, 2 eos/sep, 3 unk. Vocabulary 260."""

    vocab_size = 260

    def __init__(self, origin: str = "byte-level") -> None:
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.origin = origin

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + 4 for b in text.encode("utf-8")] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """Wraps a transformers tokenizer; adds the model's own special tokens (e.g. [CLS] ... [SEP])."""

    def __init__(self, tok: Any, origin: str = "") -> None:
        self.tok, self.origin = tok, origin
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        pad = tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _from_pretrained(name_or_dir: str, origin: str, found: list[str] | None = None) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(name_or_dir), origin)
    except Exception as exc:  # transformers raises many types here (OSError, ValueError, ImportError, ...)
        where = f"{name_or_dir} (found {', '.join(found)})" if found else name_or_dir
        missing = [c for f in found or [] for c in COMPANIONS.get(f, ()) if not (Path(name_or_dir) / c).exists()]
        lacks = f"; missing {', '.join(missing)}" if missing else ""
        raise ModelError(f"cannot load the tokenizer in {where}{lacks}: {first_line(exc)}; "
                         "pass --tokenizer NAME_OR_DIR (a directory with tokenizer files, a bundled model, or 'byte')"
                         ) from None


def load_tokenizer(path: Path, vocab_size: int, override: Path | str | None = None) -> Tokenizer:
    """The tokenizer for the model in ``path``: ``override`` (a directory, a cached name, or ``byte``), else the
    directory's own files, else the byte-level fallback (when the vocabulary has room for its 260 ids)."""
    if override is not None and str(override) == "byte":
        tok: Tokenizer = ByteTokenizer("byte-level (--tokenizer byte)")
    elif override is not None and not Path(override).is_dir():  # a name in the local Hugging Face cache
        tok = _from_pretrained(str(override), f"--tokenizer {override}")
    else:
        where = Path(override) if override is not None else path
        found = [f for f in VOCABULARY_FILES if (where / f).exists()]
        if (where / BYTE_MARKER).exists():
            tok = ByteTokenizer(f"byte-level ({BYTE_MARKER} in {where})")
        elif found:
            tok = _from_pretrained(str(where), f"--tokenizer {override}" if override is not None
                                   else f"{', '.join(found)} in {where}", found)
        elif override is None and vocab_size >= ByteTokenizer.vocab_size:
            tok = ByteTokenizer(f"byte-level fallback: {path} has no tokenizer files ({', '.join(VOCABULARY_FILES)}); "
                                "pass --tokenizer NAME_OR_DIR for the model's own")
        else:
            small = f" and its vocabulary ({vocab_size}) is too small for the byte-level fallback" if override is None else ""
            raise ModelError(f"{where} has no tokenizer files (none of {', '.join(VOCABULARY_FILES)}){small}: "
                             "pass --tokenizer NAME_OR_DIR")
    size = len(tok.tok) if isinstance(tok, HFTokenizer) else ByteTokenizer.vocab_size
    if size > vocab_size:
        raise ModelError(f"the tokenizer ({tok.origin}) has {size} tokens, more than the model's vocabulary of "
                         f"{vocab_size}: pass --tokenizer with the model's own")
    return tok
