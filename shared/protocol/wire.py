"""Wire format for activations, gradients and metadata exchanged between the three tiers (msgpack + tensors)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

# Importing the codecs package registers the lossy codecs (fp16, bf16, int8, int4, topk), so every
# receiver can decode them.
from shared.protocol.codecs import FLOAT_DTYPES, KNOWN_CODECS, CodecSpec
from shared.protocol.inplace import BULK_EXT, MessageBuffer, bulk_bins, skeleton
from shared.protocol.tensors import (DTYPES, Codec, WireError, bounded_repr, check_shape, codec_registry, dtype_name,
                                     lz4_encode, raw_encode, shorten, tensor_nbytes, torch_dtype)

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
registered by ``shared.protocol.codecs`` (imported by this module); their entry layouts are
documented there. They apply to floating tensors only and keep the ORIGINAL dtype/shape in the
entry. Per-tensor choice: ``encode(msg, tensor_codecs={"hidden": "int8", "grad": "topk:ratio=0.05"})``
or ``Message.codecs`` (specs parsed by ``shared.protocol.codecs.CodecSpec``); integer and bool tensors
always take the lossless path. A lossy encoder that cannot represent a tensor (e.g. NaN for int8)
falls back to lz4, then raw.
"""

CONTENT_TYPE = "application/x-msgpack"
WIRE_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_CONTAINERS = 1_000_000  # maps + arrays per message: bounds decode-time object overhead
MAX_META_DEPTH = 64

_TOP_KEYS = frozenset({"v", "kind", "meta", "tensors"})
_RESERVED_ENTRY_KEYS = frozenset({"dtype", "shape", "codec"})


@dataclass
class Message:
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Sender-side codec policy, tensor name -> codec spec ("int8", "topk:ratio=0.01", ...): used by
    # ``encode`` when no ``tensor_codecs`` is given. Not sent on the wire (decoded messages have {}).
    codecs: dict[str, Any] = field(default_factory=dict)


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


@dataclass(frozen=True)
class _Choice:
    codec: str  # registered wire codec
    params: tuple[tuple[str, Any], ...]  # encode_fn keyword arguments
    lossy: bool  # applies to floating tensors only


_LZ4_CHOICE = _Choice("lz4", (), False)


def _choice(spec: Any, where: str) -> _Choice:
    """Resolve a codec spec (str or CodecSpec) or a plain registered wire codec name."""
    if isinstance(spec, str) and spec in codec_registry() and spec.strip() not in KNOWN_CODECS:
        return _Choice(spec, (), False)  # a codec registered elsewhere, used as is on every tensor
    if not isinstance(spec, (str, CodecSpec)):
        raise TypeError(f"{where}: codec must be a str or CodecSpec, got {type(spec).__name__}")
    try:
        cs = CodecSpec.parse(spec)
    except ValueError as e:
        registered = ", ".join(c for c in codec_registry() if c not in KNOWN_CODECS)
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
        if choice.lossy and dt not in FLOAT_DTYPES:
            choice = lossless  # masks, labels, indices are never quantised
        used = choice.codec
        enc = codec_registry()[used].encode
        fields = enc(t, dt, **dict(choice.params)) if choice.params else enc(t, dt)
        if fields is None and used not in ("raw", "lz4"):
            fields, used = lz4_encode(t, dt), "lz4"
        if fields is None:
            fields, used = raw_encode(t, dt), "raw"
        if _RESERVED_ENTRY_KEYS & fields.keys() or "data" not in fields:
            raise ValueError(f"codec {used!r} returned bad fields {sorted(fields)}")
        tensors[name] = {"dtype": dt, "shape": list(t.shape), "codec": used, **fields}
    doc = {"v": WIRE_VERSION, "kind": msg.kind, "meta": msg.meta, "tensors": tensors}
    return msgpack.packb(doc, use_bin_type=True)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    detail = shorten(str(e))
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


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


def _unpack(data: Any, limit: int, ext_hook: Any = _refuse_ext) -> Any:
    """One msgpack document, never unpickled: no ext types (``ext_hook``), str map keys, bounded lengths and
    containers; WireError on anything malformed."""
    counter = _Counter()
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=ext_hook,
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


class _Bulk(int):
    """Where a large bin was left in the buffer: its index (see ``shared.protocol.inplace``)."""


def _bulk_hook(code: int, data: bytes) -> Any:
    if code != BULK_EXT:  # cannot happen: bulk_bins gives up on any ext type, so the skeleton holds only ours
        return _refuse_ext(code, data)
    return _Bulk(int.from_bytes(data, "big"))


def _unpack_in_place(buffer: MessageBuffer, limit: int) -> Any:
    """The document in ``buffer``, its large tensor bins as views on the buffer (``shared.protocol.inplace``)."""
    view = buffer.view()
    spans = bulk_bins(view)
    if not spans:  # nothing large, or a layout the ordinary decode should judge
        return _unpack(view, limit)
    try:
        doc = _unpack(skeleton(view, spans), limit, _bulk_hook)
    except WireError:
        return _unpack(view, limit)  # the same bytes the ordinary way, for the ordinary error
    views = buffer.adopt(spans)
    tensors = doc.get("tensors")
    for entry in tensors.values() if isinstance(tensors, dict) else ():
        for key, value in entry.items() if isinstance(entry, dict) else ():
            if type(value) is _Bulk:
                entry[key] = views[value]
    return doc


def decode(
    data: bytes | bytearray | memoryview | MessageBuffer,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_tensor_elements: int | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Message:
    """Parse and validate one message; raises WireError (and nothing else) on any bad input.

    ``reserve(nbytes)`` is told the tensors' total declared (decoded) size once every entry has been checked and
    before any is decoded; it may refuse by raising (a tier's body budget does).

    A ``MessageBuffer`` (a body as read from the network) is adopted: the message's large raw tensors
    are views on it (no copy), and its bytes are rearranged; other inputs are only read.
    """
    if not isinstance(data, (bytes, bytearray, memoryview, MessageBuffer)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"message too large: {len(data)} bytes > limit {max_bytes}")
    limit = max(len(data), 1)
    doc = _unpack_in_place(data, limit) if isinstance(data, MessageBuffer) else _unpack(data, limit)

    if not isinstance(doc, dict):
        raise WireError(f"top level must be a map, got {type(doc).__name__}")
    extra = set(doc) - _TOP_KEYS
    if extra:
        raise WireError(f"unexpected top-level key(s): {shorten(', '.join(sorted(map(repr, extra))), 120)}")
    v = doc.get("v")
    if type(v) is not int or v != WIRE_VERSION:
        raise WireError(f"unsupported wire version {bounded_repr(v)} (expected {WIRE_VERSION})")
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
            raise WireError(f"tensor {bounded_repr(name)}: entry must be a map, got {type(entry).__name__}")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise WireError(f"tensor {bounded_repr(name)}: unknown dtype {bounded_repr(dtype)}")
        shape = check_shape(name, entry.get("shape"))
        numel = math.prod(shape)
        if max_tensor_elements is not None and numel > max_tensor_elements:
            raise WireError(f"tensor {bounded_repr(name)}: {numel} elements exceeds limit {max_tensor_elements}")
        size = tensor_nbytes(dtype, shape)
        total += size
        if size > max_bytes or total > max_bytes:
            raise WireError(f"tensor {bounded_repr(name)}: total decoded size {total} bytes exceeds limit {max_bytes}")
        codec_name = entry.get("codec")
        codec = codec_registry().get(codec_name) if isinstance(codec_name, str) else None
        if codec is None:
            raise WireError(f"tensor {bounded_repr(name)}: unknown codec {bounded_repr(codec_name)}")
        plan.append((name, entry, dtype, shape, codec))
    if reserve is not None:
        reserve(total)

    tensors: dict[str, torch.Tensor] = {}
    for name, entry, dtype, shape, codec in plan:
        try:
            t = codec.decode(entry, dtype, shape)
        except WireError as e:
            raise WireError(f"tensor {bounded_repr(name)}: {e.reason}") from None
        except Exception as e:  # a registered codec choking on hostile input is still bad input
            raise WireError(f"tensor {bounded_repr(name)}: codec {codec.name!r} failed: {_one_line(e)}") from None
        if t.dtype != torch_dtype(dtype) or tuple(t.shape) != shape:
            raise WireError(f"tensor {bounded_repr(name)}: codec {codec.name!r} produced {t.dtype} {list(t.shape)}")
        tensors[name] = t
    return Message(kind=kind, meta=meta, tensors=tensors)
