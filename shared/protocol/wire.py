"""Wire format for activations, gradients and metadata exchanged between the three tiers (msgpack + tensors)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import msgpack
import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------
"""
A message is one msgpack map (HTTP content type ``application/x-msgpack``) with exactly these keys:

    {"v": 1,                      # int, wire version; anything else is refused
     "kind": str,                 # message kind, e.g. "forward", "backward"
     "meta": {str: value},        # optional (default {}); values are msgpack-native only:
                                  #   map (str keys) / array / str / int / float / bool / nil / bin
     "tensors": {name: entry}}    # optional (default {}); name is a str

Each tensor entry is a map:

    {"dtype": str,                # "float32" "float16" "bfloat16" "float64" "int64" "int32"
                                  # "int16" "int8" "uint8" "bool"
     "shape": [int, ...],         # rank 0..8, each dim 0..2**31-1 ([] is a 0-d scalar)
     "codec": str,                # "raw" or "lz4" (more may be registered)
     "data": bin,                 # codec payload
     ...codec params}             # "lz4": "raw_size": int

The uncompressed bytes of a tensor are its elements in C (row-major) order, each element
little-endian, itemsize per dtype (bfloat16 and float16 are 2 bytes, bool is 1 byte 0x00/0x01;
any non-zero byte decodes as True). bfloat16 is carried as its own 16-bit pattern, never widened.
Declared size = prod(shape) * itemsize.

Codecs:
  * "raw": ``data`` is exactly the uncompressed bytes; len(data) must equal the declared size.
  * "lz4": ``data`` is an LZ4 *block* (``lz4.block.compress(raw, store_size=False)``, no size
    prefix, no frame header); ``raw_size`` must equal the declared size and the block must
    decompress to exactly that many bytes (decompression is bounded by it).
The encoder's default codec is "lz4", but tensors under ``LZ4_MIN_BYTES`` (256) bytes, or whose
block would not be smaller than the raw bytes, are sent "raw"; receivers simply follow "codec".

Lossy codecs "fp16", "bf16", "int8", "int4", "topk" (each optionally "post": "shuffle-lz4") are
registered by ``shared.codecs`` (imported at the end of this module); their entry layouts are
documented there. They apply to floating tensors only and keep the ORIGINAL dtype/shape in the
entry. Per-tensor choice: ``encode(msg, tensor_codecs={"hidden": "int8", "grad": "topk:ratio=0.05"})``
or ``Message.codecs`` (specs parsed by ``shared.codecs.CodecSpec``); integer and bool tensors
always take the lossless path. A lossy encoder that cannot represent a tensor (e.g. NaN for int8)
falls back to lz4, then raw.
"""

CONTENT_TYPE = "application/x-msgpack"
WIRE_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_RANK = 8
MAX_DIM = 2**31 - 1
MAX_CONTAINERS = 1_000_000  # maps + arrays per message: bounds decode-time object overhead
MAX_META_DEPTH = 64
LZ4_MIN_BYTES = 256

_TOP_KEYS = frozenset({"v", "kind", "meta", "tensors"})
_RESERVED_ENTRY_KEYS = frozenset({"dtype", "shape", "codec"})

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


class WireError(ValueError):
    """Bad bytes from the network; ``reason`` is a one-line human-readable explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Message:
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Sender-side codec policy, tensor name -> codec spec ("int8", "topk:ratio=0.01", ...): used by
    # ``encode`` when no ``tensor_codecs`` is given. Not sent on the wire (decoded messages have {}).
    codecs: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Tensor bytes helpers (also meant for codecs registered elsewhere)
# ---------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; TypeError if it cannot be sent."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported on the wire (supported: {', '.join(DTYPES)})") from None


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Declared uncompressed size in bytes of a tensor of wire dtype ``dtype`` and ``shape``."""
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise WireError(f"unknown dtype {_q(dtype)}")
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
    """Writable tensor from little-endian bytes; WireError unless len(buf) is exactly the declared size."""
    need = tensor_nbytes(dtype, shape)
    if len(buf) != need:
        raise WireError(f"declared shape {list(shape)} {dtype} needs {need} bytes, got {len(buf)}")
    tdt, npdt = _DTYPES[dtype]
    if need == 0:
        return torch.empty(shape, dtype=tdt)
    arr = np.frombuffer(buf, dtype=npdt).astype(npdt.newbyteorder("="))  # always a writable copy
    t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    elif dtype == "bool":
        t = t != 0
    return t.reshape(shape)


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


def _raw_encode(t: torch.Tensor, dtype: str) -> dict[str, Any]:
    return {"data": tensor_to_bytes(t)}


def _raw_decode(entry: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    return tensor_from_bytes(_bin(entry, "data"), dtype, shape)


def _lz4_encode(t: torch.Tensor, dtype: str) -> dict[str, Any] | None:
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
    data = _bin(entry, "data")
    try:
        raw = lz4.block.decompress(data, uncompressed_size=need)  # output bounded by the declared size
    except Exception as e:  # LZ4BlockError and friends
        raise WireError(f"corrupt lz4 block: {_short(str(e))}") from None
    if len(raw) != need:
        raise WireError(f"declared shape {list(shape)} {dtype} needs {need} bytes, lz4 block gave {len(raw)}")
    return tensor_from_bytes(raw, dtype, shape)


register_codec("raw", _raw_encode, _raw_decode)
register_codec("lz4", _lz4_encode, _lz4_decode)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _check_meta(meta: Any) -> None:
    stack: list[tuple[Any, str, int]] = [(meta, "meta", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise ValueError(f"{path}: nested deeper than {MAX_META_DEPTH}")
        if v is None or isinstance(v, (bool, str, bytes, float)):
            continue
        if isinstance(v, int):
            if not -(2**63) <= v < 2**64:
                raise TypeError(f"{path}: int {v} does not fit in 64 bits")
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"{path}: map keys must be str, got {type(k).__name__}")
                stack.append((x, f"{path}.{k}", depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))
        else:
            raise TypeError(
                f"{path}: {type(v).__name__} is not msgpack-native (use dict/list/str/int/float/bool/None/bytes)"
            )


_FLOAT_NAMES = frozenset({"float32", "float16", "bfloat16", "float64"})


@dataclass(frozen=True)
class _Choice:
    codec: str  # registered wire codec
    params: tuple[tuple[str, Any], ...]  # encode_fn keyword arguments
    lossy: bool  # applies to floating tensors only


_LZ4_CHOICE = _Choice("lz4", (), False)


def _choice(spec: Any, where: str) -> _Choice:
    """Resolve a codec spec (str or CodecSpec) or a plain registered wire codec name."""
    CodecSpec = _codecs_module.CodecSpec
    if isinstance(spec, str) and spec in _CODECS and spec.strip() not in _codecs_module.KNOWN_CODECS:
        return _Choice(spec, (), False)  # a codec registered elsewhere, used as is on every tensor
    if not isinstance(spec, (str, CodecSpec)):
        raise TypeError(f"{where}: codec must be a str or CodecSpec, got {type(spec).__name__}")
    try:
        cs = CodecSpec.parse(spec)
    except ValueError as e:
        registered = ", ".join(c for c in _CODECS if c not in _codecs_module.KNOWN_CODECS)
        extra = f"; also registered: {registered}" if registered else ""
        raise ValueError(f"{where}: {e}{extra}") from None
    return _Choice(cs.wire_codec, tuple(cs.wire_params().items()), cs.lossy)


def encode(
    msg: Message,
    *,
    codec: Any = "lz4",
    tensor_codecs: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise ``msg``.

    ``codec`` is the codec (wire name or spec: "lz4", "raw", "int8:block=128", ...) for tensors not
    named in ``tensor_codecs`` (name -> spec str or CodecSpec; default ``msg.codecs``). Lossy specs
    apply to floating tensors only: integer/bool tensors go lossless (``codec`` when lossless, else
    lz4). Small/incompressible tensors go raw under lz4; a lossy codec that cannot represent a
    tensor falls back to lz4, then raw.
    """
    default = _choice(codec, "codec")
    if not isinstance(msg.kind, str):
        raise TypeError(f"kind must be str, got {type(msg.kind).__name__}")
    if not isinstance(msg.meta, dict):
        raise TypeError(f"meta must be a dict, got {type(msg.meta).__name__}")
    _check_meta(msg.meta)
    if not isinstance(msg.tensors, dict):
        raise TypeError(f"tensors must be a dict, got {type(msg.tensors).__name__}")
    per = tensor_codecs if tensor_codecs is not None else (getattr(msg, "codecs", None) or {})
    if not isinstance(per, Mapping):
        raise TypeError(f"tensor_codecs must be a mapping, got {type(per).__name__}")
    chosen = {name: _choice(spec, f"tensor {name!r}") for name, spec in per.items()}
    lossless = default if not default.lossy else _LZ4_CHOICE
    tensors: dict[str, dict[str, Any]] = {}
    for name, t in msg.tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"tensor {name!r}: only dense tensors can be sent (layout {t.layout})")
        dt = dtype_name(t.dtype)
        t = t.detach().cpu().contiguous()
        choice = chosen.get(name, default)
        if choice.lossy and dt not in _FLOAT_NAMES:
            choice = lossless  # masks, labels, indices are never quantised
        used = choice.codec
        enc = _CODECS[used].encode
        fields = enc(t, dt, **dict(choice.params)) if choice.params else enc(t, dt)
        if fields is None and used not in ("raw", "lz4"):
            fields, used = _lz4_encode(t, dt), "lz4"
        if fields is None:
            fields, used = _raw_encode(t, dt), "raw"
        if _RESERVED_ENTRY_KEYS & fields.keys() or "data" not in fields:
            raise ValueError(f"codec {used!r} returned bad fields {sorted(fields)}")
        tensors[name] = {"dtype": dt, "shape": list(t.shape), "codec": used, **fields}
    doc = {"v": WIRE_VERSION, "kind": msg.kind, "meta": msg.meta, "tensors": tensors}
    return msgpack.packb(doc, use_bin_type=True)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _q(value: Any) -> str:
    """Bounded repr of a value taken from the network, for error messages."""
    return _short(repr(value), 80)


def _one_line(e: BaseException) -> str:
    detail = _short(str(e))
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _bin(entry: dict[str, Any], key: str) -> bytes:
    v = entry.get(key)
    if not isinstance(v, bytes):
        raise WireError(f"field {key!r} must be bin, got {type(v).__name__}")
    return v


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack ext types are not allowed (got ext type {code})")


class _Counter:
    """list_hook/object_hook that caps the number of containers built while unpacking."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, obj: Any) -> Any:
        self.n += 1
        if self.n > MAX_CONTAINERS:
            raise WireError(f"message has more than {MAX_CONTAINERS} maps/arrays")
        return obj


def _check_decoded_meta(meta: dict[str, Any]) -> None:
    stack: list[Any] = [meta]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise WireError("meta map keys must be str")
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
        elif not (v is None or isinstance(v, (bool, int, float, str, bytes))):
            raise WireError(f"meta holds a non-native value ({type(v).__name__})")  # e.g. msgpack Timestamp


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise WireError(f"tensor {_q(name)}: shape must be an array, got {type(shape).__name__}")
    if len(shape) > MAX_RANK:
        raise WireError(f"tensor {_q(name)}: rank {len(shape)} exceeds {MAX_RANK}")
    for d in shape:
        if type(d) is not int:
            raise WireError(f"tensor {_q(name)}: shape {_q(shape)} has a non-int dim")
        if d < 0:
            raise WireError(f"tensor {_q(name)}: shape {shape} has a negative dim")
        if d > MAX_DIM:
            raise WireError(f"tensor {_q(name)}: shape {shape} has a dim over {MAX_DIM}")
    if math.prod(max(d, 1) for d in shape) > 2**48:  # keeps torch's storage-size arithmetic sane
        raise WireError(f"tensor {_q(name)}: shape {shape} is absurdly large")
    return tuple(shape)


def decode(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_tensor_elements: int | None = None,
) -> Message:
    """Parse and validate one message; raises WireError (and nothing else) on any bad input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"message too large: {len(data)} bytes > limit {max_bytes}")
    limit = max(len(data), 1)
    counter = _Counter()
    # Never unpickle: plain msgpack only, no ext types, str map keys, bounded lengths.
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            list_hook=counter,
            object_hook=counter,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=limit,
        )
    except WireError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, ValueError, UnicodeDecodeError, ...
        raise WireError(f"malformed msgpack: {_one_line(e)}") from None

    if not isinstance(doc, dict):
        raise WireError(f"top level must be a map, got {type(doc).__name__}")
    extra = set(doc) - _TOP_KEYS
    if extra:
        raise WireError(f"unexpected top-level key(s): {_short(', '.join(sorted(map(repr, extra))), 120)}")
    v = doc.get("v")
    if type(v) is not int or v != WIRE_VERSION:
        raise WireError(f"unsupported wire version {_q(v)} (expected {WIRE_VERSION})")
    kind = doc.get("kind")
    if not isinstance(kind, str):
        raise WireError(f"'kind' must be str, got {type(kind).__name__}")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError(f"'meta' must be a map, got {type(meta).__name__}")
    _check_decoded_meta(meta)
    entries = doc.get("tensors", {})
    if not isinstance(entries, dict):
        raise WireError(f"'tensors' must be a map, got {type(entries).__name__}")

    # Validate every entry and the total declared size before decompressing/allocating anything.
    total = 0
    plan: list[tuple[str, dict[str, Any], str, tuple[int, ...], Codec]] = []
    for name, entry in entries.items():
        if not isinstance(name, str):
            raise WireError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(entry, dict):
            raise WireError(f"tensor {_q(name)}: entry must be a map, got {type(entry).__name__}")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise WireError(f"tensor {_q(name)}: unknown dtype {_q(dtype)}")
        shape = _check_shape(name, entry.get("shape"))
        numel = math.prod(shape)
        if max_tensor_elements is not None and numel > max_tensor_elements:
            raise WireError(f"tensor {_q(name)}: {numel} elements exceeds limit {max_tensor_elements}")
        size = tensor_nbytes(dtype, shape)
        total += size
        if size > max_bytes or total > max_bytes:
            raise WireError(f"tensor {_q(name)}: total decoded size {total} bytes exceeds limit {max_bytes}")
        codec_name = entry.get("codec")
        codec = _CODECS.get(codec_name) if isinstance(codec_name, str) else None
        if codec is None:
            raise WireError(f"tensor {_q(name)}: unknown codec {_q(codec_name)}")
        plan.append((name, entry, dtype, shape, codec))

    tensors: dict[str, torch.Tensor] = {}
    for name, entry, dtype, shape, codec in plan:
        try:
            t = codec.decode(entry, dtype, shape)
        except WireError as e:
            raise WireError(f"tensor {_q(name)}: {e.reason}") from None
        except Exception as e:  # a registered codec choking on hostile input is still bad input
            raise WireError(f"tensor {_q(name)}: codec {codec.name!r} failed: {_one_line(e)}") from None
        if t.dtype != _DTYPES[dtype][0] or tuple(t.shape) != shape:
            raise WireError(f"tensor {_q(name)}: codec {codec.name!r} produced {t.dtype} {list(t.shape)}")
        tensors[name] = t
    return Message(kind=kind, meta=meta, tensors=tensors)


# Registers the lossy codecs (fp16, bf16, int8, int4, topk) so every receiver can decode them.
# At the end of the module: shared.codecs imports names defined above.
from shared.protocol import codecs as _codecs_module  # noqa: E402
