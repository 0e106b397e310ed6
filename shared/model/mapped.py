"""The frozen token embedding read through a private memory map of its safetensors file, not copied.

The token-embedding matrix is most of a device's parameters (SmolLM2-135M: 49,152 x 576 fp32, 113 MB of
the user tier's 142 MB) and never trains. Mapped copy-on-write (``numpy.memmap`` mode ``c``), a process
holds in memory only the pages of the rows it has looked up; those pages are file-backed (the kernel may
drop and re-read them), and a write, if anything ever wrote, would stay private to the process. Stored in
another float dtype than the compute dtype (bf16, fp16), the rows are looked up in the stored dtype and only
they are cast (an exact cast, so the result is bit-identical to casting the whole matrix first). Recent
safetensors (0.8 here) already hands out tensors on a private map of the file, but older ones copy (the pin
is >= 0.4), and the cast of a bf16 matrix to fp32 copies it whole either way.

Anything else (a tensor not contiguous in its file, an embedding module of another class with another
dtype, a ``max_norm`` that renormalises rows in place) is left to the ordinary copy (``None``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# safetensors dtype names (https://huggingface.co/docs/safetensors, "Format") -> torch dtypes, floats only
STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class StoredRowsEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose weight stays in its stored dtype: it looks rows up, then casts them."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)
        return rows.to(self.compute_dtype)


def header(file: Path) -> tuple[int, dict]:
    """A safetensors file's header (its 8-byte little-endian length, then JSON) and where the data begins."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


def stored_dtype(file: Path, key: str, shape: tuple[int, ...]) -> torch.dtype | None:
    """The float dtype ``key`` is stored in, if it has ``shape`` and its bytes can be mapped as they are (aligned,
    as long as its shape says)."""
    start, entries = header(file)
    entry = entries.get(key)
    dtype = STORED.get(entry.get("dtype", "")) if isinstance(entry, dict) else None
    if dtype is None or tuple(entry["shape"]) != tuple(shape):
        return None
    begin, end = entry["data_offsets"]
    count = int(np.prod(entry["shape"], dtype=np.int64))
    return dtype if count and not (start + begin) % dtype.itemsize and end - begin == count * dtype.itemsize else None


def mapped_tensor(file: Path, key: str) -> torch.Tensor:
    """``key`` of a safetensors file (``stored_dtype`` not None) as a copy-on-write memory map, in its stored dtype."""
    start, entries = header(file)
    entry = entries[key]
    begin, end = entry["data_offsets"]
    raw = np.memmap(file, dtype=np.uint8, mode="c", offset=start + begin, shape=(end - begin,))
    return torch.from_numpy(raw).view(STORED[entry["dtype"]]).view([int(n) for n in entry["shape"]])


def map_token_embedding(model: nn.Module, part: nn.Module, name: str, file: Path, key: str,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The tensor to load as ``part``'s parameter ``name`` if it is the model's token-embedding weight and can be
    mapped (see the module's doc), the module switched to ``StoredRowsEmbedding`` where its dtype differs; else None."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    module_name, _, pname = name.rpartition(".")
    if pname != "weight" or not isinstance(embedding, nn.Embedding) or part.get_submodule(module_name) is not embedding:
        return None
    dtype = stored_dtype(file, key, tuple(embedding.weight.shape))
    if dtype is None:
        return None
    if dtype != compute_dtype and (type(embedding) is not nn.Embedding or embedding.max_norm is not None):
        return None  # a subclass (Gemma's scaled embedding) computes on its weight's dtype: copied and cast instead
    if dtype != compute_dtype:
        embedding.__class__ = StoredRowsEmbedding
        embedding.compute_dtype = compute_dtype
    return mapped_tensor(file, key)
