"""Tensor bytes on the wire: dtype tables, byte conversion, shape limits and the codec registry (raw, lz4).

The entry layouts of "raw" and "lz4" are documented in ``shared.protocol.wire``'s format text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import lz4.block
import numpy as np
import torch

from shared.errors import BadMessage

MAX_RANK = 8
MAX_DIM = 2**31 - 1
LZ4_MIN_BYTES = 256

# dtype name -> (torch dtype, little-endian numpy dtype used for the bytes on the wire)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),  # carried as its 16-bit pattern
    "float64": (torch.float64, np.dtype("<f8")),
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("u1")),  # one byte per element
}
_NAME_OF: dict[torch.dtype, str] = {td: name for name, (td, _) in _DTYPES.items()}
DTYPES: tuple[str, ...] = tuple(_DTYPES)


class WireError(BadMessage):
    """Bad bytes from the network (400); ``reason`` is a one-line human-readable explanation."""


# ---------------------------------------------------------------------------------------------
# Error text (for messages about bytes taken from the network)
# ---------------------------------------------------------------------------------------------


def shorten(text: str, limit: int = 200) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters with "..."."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_repr(value: Any) -> str:
    """Bounded repr of a value taken from the network, for error messages."""
    return shorten(repr(value), 80)


def bin_field(entry: dict[str, Any], key: str) -> bytes | memoryview:
    """The bin field ``key`` of a tensor entry (a memoryview when decoded in place); WireError if it is absent
    or not bin."""
    v = entry.get(key)
    if not isinstance(v, (bytes, memoryview)):
        raise WireError(f"field {key!r} must be bin, got {type(v).__name__}")
    return v


# ---------------------------------------------------------------------------------------------
# Tensor bytes helpers (also meant for codecs registered elsewhere)
# ---------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; TypeError if it cannot be sent."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported on the wire (supported: {', '.join(DTYPES)})") from None


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of wire dtype name ``dtype`` (one of ``DTYPES``); KeyError otherwise."""
    return _DTYPES[dtype][0]


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Declared uncompressed size in bytes of a tensor of wire dtype ``dtype`` and ``shape``."""
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise WireError(f"unknown dtype {bounded_repr(dtype)}")
    return math.prod(shape) * _DTYPES[dtype][1].itemsize


def tensor_to_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian, C-order bytes of ``t`` (a CPU tensor of a supported dtype), as a flat memoryview."""
    t = t.detach().cpu().contiguous()
    name = dtype_name(t.dtype)
    if name == "bfloat16":
        t = t.view(torch.int16)
    elif name == "bool":
        t = t.view(torch.uint8)
    arr = t.resolve_conj().resolve_neg().numpy().reshape(-1)
    arr = arr.astype(_DTYPES[name][1], copy=False)  # byte-swaps only on big-endian hosts
    return memoryview(arr.view(np.uint8))


def tensor_from_bytes(buf: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Writable tensor from little-endian bytes; WireError unless len(buf) is exactly the declared size.

    It shares memory with ``buf`` where ``buf`` is writable and aligned for the dtype (a bin decoded in
    place, a bytearray); otherwise it is a copy.
    """
    need = tensor_nbytes(dtype, shape)
    if len(buf) != need:
        raise WireError(f"declared shape {list(shape)} {dtype} needs {need} bytes, got {len(buf)}")
    tdt, npdt = _DTYPES[dtype]
    if need == 0:
        return torch.empty(shape, dtype=tdt)
    arr = np.frombuffer(buf, dtype=npdt)
    if not (arr.flags.writeable and arr.flags.aligned and npdt.isnative):
        arr = arr.astype(npdt.newbyteorder("="))  # a writable, aligned, native copy
    t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    elif dtype == "bool":
        t = t != 0
    return t.reshape(shape)


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """A decoded entry's shape as a tuple; WireError (naming tensor ``name``) unless it is within limits."""
    q = bounded_repr
    if not isinstance(shape, list):
        raise WireError(f"tensor {q(name)}: shape must be an array, got {type(shape).__name__}")
    if len(shape) > MAX_RANK:
        raise WireError(f"tensor {q(name)}: rank {len(shape)} exceeds {MAX_RANK}")
    for d in shape:
        if type(d) is not int:
            raise WireError(f"tensor {q(name)}: shape {q(shape)} has a non-int dim")
        if d < 0:
            raise WireError(f"tensor {q(name)}: shape {shape} has a negative dim")
        if d > MAX_DIM:
            raise WireError(f"tensor {q(name)}: shape {shape} has a dim over {MAX_DIM}")
    if math.prod(max(d, 1) for d in shape) > 2**48:  # keeps torch's storage-size arithmetic sane
        raise WireError(f"tensor {q(name)}: shape {shape} is absurdly large")
    return tuple(shape)


# ---------------------------------------------------------------------------------------------
# Codec registry
# ---------------------------------------------------------------------------------------------

# encode_fn(tensor, dtype_name, **params) -> entry fields ({"data": bytes, **params}) or None to
# send losslessly instead ("raw" for "raw"/"lz4"; lz4, else raw, for any other codec). The tensor is
# detached, on CPU and contiguous; ``params`` (only passed when non-empty) come from a CodecSpec.
EncodeFn = Callable[..., "dict[str, Any] | None"]
# decode_fn(entry, dtype_name, shape) -> tensor of exactly that dtype and shape; raise WireError on
# bad input. Called only after dtype/shape and the declared size have been checked against limits.
DecodeFn = Callable[[dict[str, Any], str, tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class Codec:
    name: str
    encode: EncodeFn
    decode: DecodeFn


_CODECS: dict[str, Codec] = {}


def register_codec(name: str, encode_fn: EncodeFn, decode_fn: DecodeFn, *, replace: bool = False) -> None:
    """Register a tensor codec under ``name`` (the value of the entry's "codec" field)."""
    if not isinstance(name, str) or not name:
        raise ValueError("codec name must be a non-empty str")
    if name in _CODECS and not replace:
        raise ValueError(f"codec {name!r} is already registered")
    _CODECS[name] = Codec(name, encode_fn, decode_fn)


def codecs() -> tuple[str, ...]:
    return tuple(_CODECS)


def codec_registry() -> Mapping[str, Codec]:
    """Read-only live view of the registered codecs, by name, in registration order."""
    return MappingProxyType(_CODECS)


def raw_encode(t: torch.Tensor, dtype: str) -> dict[str, Any]:
    """The "raw" codec's entry fields for ``t``."""
    return {"data": tensor_to_bytes(t)}


def _raw_decode(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    return tensor_from_bytes(bin_field(entry, "data"), dtype, shape)


def lz4_encode(t: torch.Tensor, dtype: str) -> dict[str, Any] | None:
    """The "lz4" codec's entry fields for ``t``; None when it is small or the block would not be smaller."""
    raw = tensor_to_bytes(t)
    if raw.nbytes < LZ4_MIN_BYTES:
        return None
    packed = lz4.block.compress(raw, store_size=False)
    if len(packed) >= raw.nbytes:
        return None
    return {"data": packed, "raw_size": raw.nbytes}


def _lz4_decode(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    need = tensor_nbytes(dtype, shape)
    raw_size = entry.get("raw_size")
    if type(raw_size) is not int:
        raise WireError("lz4 entry needs an int 'raw_size'")
    if raw_size != need:
        raise WireError(f"declared shape {list(shape)} {dtype} needs {need} bytes, raw_size says {raw_size}")
    data = bin_field(entry, "data")
    try:
        # output bounded by the declared size; a bytearray, so the tensor can use it without a copy
        raw = lz4.block.decompress(data, uncompressed_size=need, return_bytearray=True)
    except Exception as e:  # LZ4BlockError and friends
        raise WireError(f"corrupt lz4 block: {shorten(str(e))}") from None
    if len(raw) != need:
        raise WireError(f"declared shape {list(shape)} {dtype} needs {need} bytes, lz4 block gave {len(raw)}")
    return tensor_from_bytes(raw, dtype, shape)


register_codec("raw", raw_encode, _raw_decode)
register_codec("lz4", lz4_encode, _lz4_decode)
