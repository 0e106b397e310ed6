"""The frozen token embedding read through a private memory map of its safetensors file, not copied, its rows
looked up by reading them from the file.

The token-embedding matrix is most of a device's parameters (SmolLM2-135M: 49,152 x 576 fp32, 113 MB of
the user tier's 142 MB) and never trains. Mapped copy-on-write (``numpy.memmap`` mode ``c``), the weight
costs no memory until something touches its pages; a write, if anything ever wrote, would stay private to
the process. A lookup does not touch them: it reads the rows it needs from the file with ``os.preadv`` into
a fresh buffer (``FileRows``). Indexing the map instead would map, for each row, the page-cache folio that
holds it, and a kernel with large page-cache folios (Linux 6.18 here: 2 MB folios, mapped whole) maps
nearly all of the matrix for a batch's few hundred rows. The map stays the weight for everything else (a
tied head's matmul, a move to another device, a checkpoint); once the weight is no longer the mapped tensor
as loaded (moved, copied, written in place), lookups index the weight. Stored in another float dtype than
the compute dtype (bf16, fp16), the rows are looked up in the stored dtype and only they are cast (an exact
cast, so the result is bit-identical to casting the whole matrix first). Recent safetensors (0.8 here)
already hands out tensors on a private map of the file, but older ones copy (the pin is >= 0.4), and the
cast of a bf16 matrix to fp32 copies it whole either way.

Anything else (a tensor not contiguous in its file, an embedding module of another class with another
dtype, a ``max_norm`` that renormalises rows in place) is left to the ordinary copy (``None``); an
embedding subclass with its own forward (Gemma's scaled embedding) in the compute dtype is mapped and
indexed as it is.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# safetensors dtype names (https://huggingface.co/docs/safetensors, "Format") -> torch dtypes, floats only
STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class FileRows:
    """The rows of a 2-D tensor stored contiguously (row-major) in a file, read with ``os.preadv`` on demand.

    It answers for ``tensor`` (the weight as loaded from that file) while the weight is still that tensor: on
    the CPU, the same memory, not written since (``_version``).
    """

    def __init__(self, file: Path, offset: int, tensor: torch.Tensor) -> None:
        self.fd = os.open(file, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        self.offset, self.dtype = offset, tensor.dtype
        self.rows, self.width = (int(n) for n in tensor.shape)
        self.row_bytes = self.width * tensor.element_size()
        self.ptr, self.version = tensor.data_ptr(), tensor._version

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a deep copy's weight is a copy in memory, not the mapped tensor: it indexes it

    def serves(self, weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.data_ptr() == self.ptr and weight._version == self.version
                and weight.dtype == self.dtype and tuple(weight.shape) == (self.rows, self.width))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor | None:
        """``ids``' rows, shaped ``ids.shape + (width,)``; None if an id is out of range (the caller's lookup says so)."""
        unique, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
        if unique.numel() == 0:
            return torch.empty(*ids.shape, self.width, dtype=self.dtype)
        if int(unique[0]) < 0 or int(unique[-1]) >= self.rows:
            return None
        buffer = bytearray(unique.numel() * self.row_bytes)
        view, wanted = memoryview(buffer), unique.tolist()
        start = 0
        for end in range(1, len(wanted) + 1):  # one read per run of consecutive ids
            if end == len(wanted) or wanted[end] != wanted[end - 1] + 1:
                self._read(view[start * self.row_bytes:end * self.row_bytes], wanted[start])
                start = end
        rows = torch.frombuffer(buffer, dtype=self.dtype).view(len(wanted), self.width)
        return rows[inverse].view(*ids.shape, self.width)

    def _read(self, into: memoryview, row: int) -> None:
        done, at = 0, self.offset + row * self.row_bytes
        while done < len(into):
            n = os.preadv(self.fd, [into[done:]], at + done)
            if n <= 0:
                raise OSError(f"the embedding's file ended {len(into) - done} bytes early")
            done += n


class StoredRowsEmbedding(nn.Embedding):
    """An ``nn.Embedding`` on a mapped weight: it reads the rows a lookup needs from the file (``FileRows``) while
    the weight is the mapped tensor as loaded, then casts them to the compute dtype (the weight stays in its
    stored dtype)."""

    compute_dtype: torch.dtype = torch.float32
    file_rows: FileRows | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = None
        if self.file_rows is not None and self.file_rows.serves(self.weight) and not input.is_floating_point():
            rows = self.file_rows.lookup(input)
        if rows is None:
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
    mapped (see the module's doc), the module switched to ``StoredRowsEmbedding`` (rows read from the file); else
    None."""
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
    plain = type(embedding) is nn.Embedding and embedding.max_norm is None
    if dtype != compute_dtype and not plain:
        return None  # a subclass (Gemma's scaled embedding) computes on its weight's dtype: copied and cast instead
    tensor = mapped_tensor(file, key)
    if plain:
        embedding.__class__ = StoredRowsEmbedding
        embedding.compute_dtype = compute_dtype
        if hasattr(os, "preadv"):  # POSIX; elsewhere lookups index the map
            start, entries = header(file)
            embedding.file_rows = FileRows(file, start + entries[key]["data_offsets"][0], tensor)
    return tensor
