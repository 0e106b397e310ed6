"""Property and refusal tests for shared.protocol.wire (the tensor/metadata wire format) and its tensor bytes."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.protocol import tensors as tensor_module
from shared.protocol import wire
from shared.protocol.tensors import (DTYPES, codec_registry, register_codec, tensor_from_bytes, tensor_nbytes,
                                     tensor_to_bytes)
from shared.protocol.wire import CONTENT_TYPE, Message, WireError, decode, encode

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# same-size integer type used to compare floats bit for bit (NaN payloads, -0.0)
_AS_INT = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in _TORCH.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_AS_INT[t.dtype]) if t.dtype in _AS_INT else t


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


@st.composite
def tensors(draw: st.DrawFn, dtype: str | None = None) -> torch.Tensor:
    name = dtype or draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=4))
    n = math.prod(shape)
    if name == "bool":
        vals = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.bool).reshape(shape)
    size = n * _ITEMSIZE[name]
    # random bytes (incompressible) or a short repeated pattern (so lz4 actually kicks in)
    raw = draw(
        st.one_of(
            st.binary(min_size=size, max_size=size),
            st.binary(min_size=1, max_size=4).map(lambda p: (p * (size // len(p) + 1))[:size]),
        )
    )
    if size == 0:
        return torch.empty(shape, dtype=_TORCH[name])
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return u8.view(_TORCH[name]).reshape(shape).clone()


def big_tensors() -> st.SearchStrategy[torch.Tensor]:
    """Tensors large enough (>= 256 bytes) for lz4 to be tried."""
    return st.builds(
        lambda dt, rows, fill: torch.full((rows, 64), fill, dtype=_TORCH[dt]),
        st.sampled_from([d for d in DTYPES if d != "bool"]),
        st.integers(4, 20),
        st.integers(0, 100),
    )


def pack(doc: Any) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def entry(dtype: str = "float32", shape: list[int] | None = None, codec: str = "raw", **kw: Any) -> dict[str, Any]:
    shape = [2, 3] if shape is None else shape
    e: dict[str, Any] = {"dtype": dtype, "shape": shape, "codec": codec}
    if "data" not in kw:
        kw["data"] = bytes(tensor_nbytes(dtype, shape))
    e.update(kw)
    return e


def doc(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"v": 1, "kind": "forward", "meta": {}, "tensors": {}}
    d.update(kw)
    return d


def refused(data: bytes, match: str, **kw: Any) -> WireError:
    with pytest.raises(WireError, match=match) as ei:
        decode(data, **kw)
    assert ei.value.reason == str(ei.value)
    assert "\n" not in ei.value.reason
    return ei.value


# ----------------------------------------------------------------------------------- round trips


@FAST
@given(ts=st.lists(tensors(), min_size=0, max_size=4), codec=st.sampled_from(["raw", "lz4"]))
def test_roundtrip_all_dtypes(ts: list[torch.Tensor], codec: str) -> None:
    msg = Message(kind="k", meta={"step": 3}, tensors={f"t{i}": t for i, t in enumerate(ts)})
    out = decode(encode(msg, codec=codec))
    assert out.kind == "k" and out.meta == {"step": 3}
    assert list(out.tensors) == list(msg.tensors)
    for name, t in msg.tensors.items():
        assert_bit_equal(out.tensors[name], t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", ["raw", "lz4"])
@pytest.mark.parametrize("shape", [[], [0], [3, 0, 2], [5], [2, 3, 4, 5]])
def test_roundtrip_each_dtype_and_shape(dtype: str, codec: str, shape: list[int]) -> None:
    n = math.prod(shape)
    t = (torch.arange(n) % 7 - 3).to(_TORCH[dtype]).reshape(shape)
    out = decode(encode(Message("k", tensors={"x": t}), codec=codec)).tensors["x"]
    assert_bit_equal(out, t)
    if dtype == "bool":  # decoded tensors are writable
        out.logical_not_()
    else:
        out.add_(1)


def test_float_specials_bit_exact() -> None:
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-8, 3.5], dtype=dt)
        payload_nan = t.view(_AS_INT[dt]).clone()
        payload_nan[0] |= 1  # a NaN with a different payload
        t = payload_nan.view(dt).repeat(50)
        for codec in ("raw", "lz4"):
            assert_bit_equal(decode(encode(Message("k", tensors={"x": t}), codec=codec)).tensors["x"], t)


@FAST
@given(t=big_tensors())
def test_lz4_used_for_compressible_and_bounded(t: torch.Tensor) -> None:
    data = encode(Message("k", tensors={"x": t}))
    e = msgpack.unpackb(data)["tensors"]["x"]
    assert e["codec"] == "lz4"
    assert e["raw_size"] == t.numel() * t.element_size()
    assert len(e["data"]) < e["raw_size"]
    assert_bit_equal(decode(data).tensors["x"], t)


def test_small_or_incompressible_go_raw() -> None:
    small = torch.zeros(10)
    noise = torch.frombuffer(bytearray(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()), dtype=torch.uint8)
    for t in (small, noise):
        e = msgpack.unpackb(encode(Message("k", tensors={"x": t})))["tensors"]["x"]
        assert e["codec"] == "raw" and len(e["data"]) == t.numel() * t.element_size()
        assert "raw_size" not in e


def test_bf16_stays_two_bytes_per_element() -> None:
    t = torch.randn(37, 11).to(torch.bfloat16)
    data = encode(Message("k", tensors={"x": t}), codec="raw")
    e = msgpack.unpackb(data)["tensors"]["x"]
    assert e["dtype"] == "bfloat16" and len(e["data"]) == t.numel() * 2
    assert len(data) < t.numel() * 2 + 100
    out = decode(data).tensors["x"]
    assert out.dtype == torch.bfloat16
    assert_bit_equal(out, t)


def test_little_endian_on_the_wire() -> None:
    e = msgpack.unpackb(encode(Message("k", tensors={"x": torch.tensor([1, 258], dtype=torch.int32)}), codec="raw"))
    assert e["tensors"]["x"]["data"] == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    assert CONTENT_TYPE == "application/x-msgpack"


def test_encode_detaches_moves_and_makes_contiguous() -> None:
    w = torch.randn(4, 5, requires_grad=True)
    y = (w * 2).t()  # non-contiguous, part of a graph
    assert not y.is_contiguous() and y.requires_grad
    out = decode(encode(Message("k", tensors={"y": y}))).tensors["y"]
    assert not out.requires_grad and out.is_contiguous()
    assert_bit_equal(out, y.detach())
    out2 = decode(encode(Message("k", tensors={"x": torch.arange(6)[::2]}))).tensors["x"]
    assert out2.tolist() == [0, 2, 4]


meta_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=20,
)


@FAST
@given(meta=st.dictionaries(st.text(max_size=8), meta_values, max_size=5), kind=st.text(max_size=10))
def test_meta_roundtrip(meta: dict[str, Any], kind: str) -> None:
    out = decode(encode(Message(kind, meta=meta)))
    assert out.kind == kind and out.meta == meta and out.tensors == {}


@pytest.mark.parametrize(
    "meta",
    [{"x": object()}, {"x": (1, 2)}, {"x": torch.Size([2])}, {1: "int key"}, {"x": {2: 3}}, {"x": [1, {"y": {1.5}}]}, {"x": 2**64}],
)
def test_encode_refuses_non_native_meta(meta: dict[Any, Any]) -> None:
    with pytest.raises(TypeError):
        encode(Message("k", meta=meta))


def test_encode_refuses_bad_inputs() -> None:
    with pytest.raises(TypeError):
        encode(Message("k", tensors={"x": [1, 2]}))  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode(Message("k", tensors={"x": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(ValueError, match="unknown codec"):
        encode(Message("k"), codec="zstd")
    deep: list[Any] = []
    cur = deep
    for _ in range(200):
        cur.append([])
        cur = cur[0]
    with pytest.raises(ValueError):
        encode(Message("k", meta={"deep": deep}))


def test_meta_and_tensors_may_be_omitted() -> None:
    out = decode(pack({"v": 1, "kind": "ping"}))
    assert out == Message("ping")


# ----------------------------------------------------------------------------------- refusals


def test_refuse_wrong_version() -> None:
    refused(pack(doc(v=2)), "unsupported wire version 2")
    refused(pack(doc(v=True)), "unsupported wire version")
    refused(pack({"kind": "k"}), "unsupported wire version")


def test_refuse_structure() -> None:
    refused(pack([1, "k", {}, {}]), "top level must be a map")
    refused(pack(b"x"), "top level must be a map")
    refused(pack(doc(extra=1)), "unexpected top-level key")
    refused(pack(doc(kind=5)), "'kind' must be str")
    refused(pack(doc(meta=[])), "'meta' must be a map")
    refused(pack(doc(tensors=[])), "'tensors' must be a map")
    refused(pack(doc(tensors={"x": [1]})), "entry must be a map")
    refused(pack({"v": 1, "kind": "k", 1: 2}), "malformed msgpack")  # non-str map key
    refused(pack(doc(meta={b"k": 1})), "keys must be str")
    refused(pack(doc(tensors={b"x": entry()})), "tensor names must be str")


def test_refuse_unknown_dtype_and_codec() -> None:
    refused(pack(doc(tensors={"x": entry(dtype="complex64", data=b"")})), "tensor 'x': unknown dtype 'complex64'")
    refused(pack(doc(tensors={"x": entry(codec="zstd")})), "tensor 'x': unknown codec 'zstd'")


@pytest.mark.parametrize(
    "shape,match",
    [
        ([-1, 3], "negative dim"),
        ([2, "3"], "non-int dim"),
        ([2, True], "non-int dim"),
        ([2.0], "non-int dim"),
        ([1] * 9, "rank 9 exceeds 8"),
        ([2**40, 0], "dim over"),
        ([2**31 - 1, 2**31 - 1, 0], "absurdly large"),
        ("2x3", "shape must be an array"),
    ],
)
def test_refuse_bad_shapes(shape: Any, match: str) -> None:
    refused(pack(doc(tensors={"x": entry(shape=shape, data=b"")})), match)


def test_refuse_shape_disagreeing_with_bytes_raw() -> None:
    err = refused(pack(doc(tensors={"x": entry(shape=[2, 3], data=bytes(20))})), "tensor 'x'")
    assert err.reason == "tensor 'x': declared shape [2, 3] float32 needs 24 bytes, got 20"
    refused(pack(doc(tensors={"x": entry(shape=[], data=bytes(5))})), "needs 4 bytes, got 5")
    refused(pack(doc(tensors={"x": entry(shape=[0], data=b"\0")})), "needs 0 bytes, got 1")
    refused(pack(doc(tensors={"x": entry(data="text")})), "'data' must be bin")


def test_refuse_shape_disagreeing_with_bytes_lz4() -> None:
    t = torch.zeros(100, 10)
    good = msgpack.unpackb(encode(Message("k", tensors={"x": t})))
    e = good["tensors"]["x"]
    assert e["codec"] == "lz4"
    # shape changed, raw_size left alone -> raw_size lies about the declared shape
    refused(pack(doc(tensors={"x": {**e, "shape": [100, 11]}})), "raw_size says 4000")
    # both changed consistently but the block decompresses to 4000 bytes, not 4400
    refused(pack(doc(tensors={"x": {**e, "shape": [100, 11], "raw_size": 4400}})), "tensor 'x': .*lz4")
    # shape smaller than the block: bounded decompression must fail, not overrun
    refused(pack(doc(tensors={"x": {**e, "shape": [10, 10], "raw_size": 400}})), "tensor 'x': .*lz4")
    refused(pack(doc(tensors={"x": {**e, "raw_size": "4000"}})), "int 'raw_size'")
    refused(pack(doc(tensors={"x": {k: v for k, v in e.items() if k != "raw_size"}})), "int 'raw_size'")
    refused(pack(doc(tensors={"x": {**e, "data": e["data"][:-3]}})), "tensor 'x'")
    refused(pack(doc(tensors={"x": {**e, "data": b"\xff" * 50}})), "tensor 'x'")


def test_refuse_too_large() -> None:
    data = encode(Message("k", tensors={"x": torch.randn(1000)}), codec="raw")
    refused(data, "message too large", max_bytes=len(data) - 1)
    assert decode(data, max_bytes=len(data) + 4000).tensors["x"].shape == (1000,)
    # small on the wire, huge when decompressed
    zeros = encode(Message("k", tensors={"x": torch.zeros(1_000_000)}))
    assert len(zeros) < 100_000
    refused(zeros, "exceeds limit 100000", max_bytes=100_000)
    # declared total across tensors
    two = encode(Message("k", tensors={"a": torch.zeros(10_000), "b": torch.zeros(10_000)}))
    refused(two, "tensor 'b': total decoded size 80000 bytes exceeds limit 60000", max_bytes=60_000)
    # huge declared shape with a tiny payload is refused before any allocation
    refused(pack(doc(tensors={"x": entry(shape=[2**20, 2**20], data=b"", codec="lz4", raw_size=2**62)})), "exceeds limit")


def test_refuse_over_max_tensor_elements() -> None:
    data = encode(Message("k", tensors={"x": torch.zeros(10, 10)}))
    refused(data, "tensor 'x': 100 elements exceeds limit 99", max_tensor_elements=99)
    assert decode(data, max_tensor_elements=100).tensors["x"].numel() == 100


def test_refuse_ext_types() -> None:
    refused(pack(doc(meta={"x": msgpack.ExtType(5, b"abc")})), "ext types are not allowed")
    refused(pack(msgpack.ExtType(1, b"")), "ext types are not allowed")
    refused(pack(doc(meta={"t": msgpack.Timestamp(1, 2)})), "non-native value")


def test_refuse_malformed_msgpack() -> None:
    good = encode(Message("k", meta={"a": 1}))
    refused(good + b"\x00", "malformed msgpack")  # extra data
    refused(good[:-1], "malformed msgpack")  # truncated
    refused(b"\xc1", "malformed msgpack")  # reserved byte
    refused(b"", "malformed msgpack")
    refused(b"\x91" * 100_000 + b"\xc0", "malformed msgpack")  # too deep
    refused(b"\xa2\xff\xfe", "malformed msgpack")  # invalid utf-8 str
    refused(b"\xdd\xff\xff\xff\xff", "malformed msgpack")  # array longer than the data
    refused(b"\xc6\x7f\xff\xff\xff", "malformed msgpack")  # bin longer than the data


def test_error_messages_are_bounded() -> None:
    err = refused(pack(doc(tensors={"n" * 100_000: entry(dtype="d" * 100_000, data=b"")})), "unknown dtype")
    assert len(err.reason) < 300
    err = refused(pack(doc(**{"k" * 100_000: 1})), "unexpected top-level key")
    assert len(err.reason) < 300


def test_refuse_too_many_containers() -> None:
    n = wire.MAX_CONTAINERS + 1
    data = b"\x81\xa1m\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    refused(data, "more than")


def test_decode_never_unpickles() -> None:
    import pickle

    refused(pickle.dumps({"v": 1, "kind": "k"}), "malformed msgpack|top level")


# ----------------------------------------------------------------------------------- fuzz


def _decode_ok_or_wire_error(data: bytes, **kw: Any) -> None:
    try:
        out = decode(data, **kw)
    except WireError as e:
        assert e.reason and "\n" not in e.reason
        return
    assert isinstance(out, Message) and isinstance(out.kind, str) and isinstance(out.meta, dict)
    for t in out.tensors.values():
        assert isinstance(t, torch.Tensor)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_ok_or_wire_error(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=60))
def test_fuzz_random_bytes_after_valid_prefix(data: bytes) -> None:
    _decode_ok_or_wire_error(b"\x84\xa1v\x01\xa4kind\xa1k\xa4meta\x80\xa7tensors" + data)


_SAMPLES = [
    encode(
        Message(
            "fwd",
            meta={"step": 1, "ids": [1, 2, 3], "lr": 1e-4, "tag": None, "blob": b"\x00\x01", "ok": True},
            tensors={
                "h": torch.arange(200, dtype=torch.float32).reshape(20, 10) % 5,
                "bf": torch.linspace(-1, 1, 300).to(torch.bfloat16),
                "mask": torch.arange(64) % 3 == 0,
                "s": torch.tensor(7, dtype=torch.int64),
                "e": torch.zeros(0, 4, dtype=torch.float16),
            },
        ),
        codec=codec,
    )
    for codec in ("raw", "lz4")
]


@settings(max_examples=400, deadline=None)
@given(
    which=st.integers(0, len(_SAMPLES) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["set", "xor", "del", "ins"])), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 10_000),
    max_elems=st.none() | st.integers(0, 500),
)
def test_fuzz_mutations(which: int, edits: list[tuple[int, int, str]], cut: int | None, max_elems: int | None) -> None:
    buf = bytearray(_SAMPLES[which])
    for pos, val, op in edits:
        i = pos % (len(buf) or 1)
        if op == "set" and buf:
            buf[i] = val
        elif op == "xor" and buf:
            buf[i] ^= 1 << (val % 8)
        elif op == "del" and buf:
            del buf[i]
        elif op == "ins":
            buf.insert(i, val)
    if cut is not None:
        del buf[cut % (len(buf) + 1) :]
    _decode_ok_or_wire_error(bytes(buf), max_tensor_elements=max_elems)


def test_samples_decode() -> None:
    for data in _SAMPLES:
        out = decode(data)
        assert out.kind == "fwd" and out.tensors["bf"].dtype == torch.bfloat16
        assert out.tensors["s"].shape == () and out.tensors["e"].shape == (0, 4)


# ----------------------------------------------------------------------------------- registry


def test_register_codec_extends_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_module, "_CODECS", dict(codec_registry()))  # keep the registration local to this test

    def enc(t: torch.Tensor, dtype: str) -> dict[str, Any]:
        raw = bytes(tensor_to_bytes(t))
        return {"data": raw[::-1], "rev": True}

    def dec(e: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        if e.get("rev") is not True:
            raise WireError("missing rev")
        return tensor_from_bytes(e["data"][::-1], dtype, shape)

    with pytest.raises(ValueError, match="already registered"):
        register_codec("raw", enc, dec)
    register_codec("rev", enc, dec)
    t = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    data = encode(Message("k", tensors={"x": t}), codec="rev")
    e = msgpack.unpackb(data)["tensors"]["x"]
    assert e["codec"] == "rev" and e["rev"] is True
    assert torch.equal(decode(data).tensors["x"], t)
    refused(pack(doc(tensors={"x": {**e, "rev": False}})), "tensor 'x': missing rev")
    refused(pack(doc(tensors={"x": {**e, "data": b"\x00"}})), "tensor 'x': declared shape")

    register_codec("bad", enc, lambda e, d, s: torch.zeros(1), replace=True)
    refused(pack(doc(tensors={"x": {**e, "codec": "bad"}})), "codec 'bad' produced")
    register_codec("boom", enc, lambda e, d, s: 1 / 0)
    refused(pack(doc(tensors={"x": {**e, "codec": "boom"}})), "codec 'boom' failed")


def test_tensor_nbytes() -> None:
    assert tensor_nbytes("bfloat16", [3, 4]) == 24
    assert tensor_nbytes("bool", []) == 1
    assert tensor_nbytes("float64", [0, 9]) == 0
    with pytest.raises(WireError, match="unknown dtype 'x'"):
        tensor_nbytes("x", [1])
