"""Codec specs (shared.protocol.codecs.spec): parsing, printing, errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.protocol.codecs import KNOWN_CODECS, CodecSpec

from codec_helpers import FAST


@pytest.mark.parametrize(
    "text",
    [
        "fp32", "raw", "lz4", "fp16", "bf16", "int8", "int4", "int8:block=128", "int4:block=32",
        "int4+shuffle-lz4", "fp16+shuffle-lz4", "topk:ratio=0.01", "topk:k=100", "topk:k=5,values=fp16",
        "topk:ratio=0.05,values=fp32+shuffle-lz4", "int8:block=7+shuffle-lz4",
    ],
)
def test_spec_roundtrip(text: str) -> None:
    spec = CodecSpec.parse(text)
    assert str(spec) == text
    assert CodecSpec.parse(str(spec)) == spec and hash(CodecSpec.parse(text)) == hash(spec)
    assert spec.name == text.split(":")[0].split("+")[0]


def test_spec_fields_and_normalisation() -> None:
    s = CodecSpec.parse(" topk : values=fp16 , ratio=1e-2 + shuffle-lz4 ")
    assert s.name == "topk" and dict(s.params) == {"ratio": 0.01, "values": "fp16"} and s.post == "shuffle-lz4"
    assert str(s) == "topk:ratio=0.01,values=fp16+shuffle-lz4"
    assert CodecSpec.parse("int8").params == {} and CodecSpec.parse("int8:block=128").params == {"block": 128}
    assert CodecSpec("int8", {"block": 32}) == CodecSpec.parse("int8:block=32")
    assert CodecSpec("topk", {"ratio": 1}).params["ratio"] == 1.0
    assert CodecSpec.parse(CodecSpec.parse("bf16")) == CodecSpec.parse("bf16")
    assert not CodecSpec.parse("fp32").lossy and CodecSpec.parse("fp32").wire_codec == "lz4"
    assert CodecSpec.parse("int4").lossy and CodecSpec.parse("int4").wire_params() == {"block": 64, "channels": "rms"}
    assert CodecSpec.parse("int8:channels=none").wire_params() == {"block": 64}  # plain blockwise absmax
    assert CodecSpec.parse("topk:k=3,values=fp16").wire_params() == {"k": 3, "values": "float16"}
    with pytest.raises(TypeError):
        CodecSpec.parse("int8").params["block"] = 3  # type: ignore[index]
    assert set(KNOWN_CODECS) >= {"fp32", "fp16", "bf16", "int8", "int4", "topk"}


@pytest.mark.parametrize(
    "text,match",
    [
        ("zstd", "unknown codec 'zstd' \\(known codecs: fp32, fp16, bf16, int8, int4, topk"),
        ("", "unknown codec ''"),
        ("INT8", "unknown codec 'INT8'"),
        ("int8:blok=3", "codec 'int8' has no param 'blok' \\(it takes: block, channels; known codecs: fp32"),
        ("fp16:block=3", "codec 'fp16' has no param 'block' \\(it takes: no params"),
        ("int8:block=abc", "block='abc' is not a valid int"),
        ("int8:block=1.5", "not a valid int"),
        ("int8:block=0", "block 0 out of range"),
        ("int8:block=64,block=32", "given twice"),
        ("int8:", "empty params"),
        ("int8:block", "params must be key=value"),
        ("int8:block=", "params must be key=value"),
        ("topk", "exactly one of k=<int> or ratio=<float>"),
        ("topk:k=3,ratio=0.1", "exactly one of"),
        ("topk:k=0", "k must be an int >= 1"),
        ("topk:ratio=0", "ratio must be in \\(0, 1\\]"),
        ("topk:ratio=2", "ratio must be in"),
        ("topk:ratio=nan", "ratio must be in"),
        ("topk:ratio=x", "not a valid float"),
        ("topk:k=3,values=bf16", "values must be one of fp32, fp16"),
        ("int8+zstd", "unknown post-processing 'zstd' \\(known: shuffle-lz4\\)"),
        ("int8+", "empty post-processing"),
        ("fp32+shuffle-lz4", "lossless"),
        ("int8+shuffle-lz4+shuffle-lz4", "unknown post-processing"),
    ],
)
def test_spec_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CodecSpec.parse(text)


def test_spec_constructor_errors() -> None:
    for args, match in (
        (("int8", {"block": "64"}), "block must be an int"),
        (("int8", {"block": True}), "block must be an int"),
        (("topk", {"k": 2.0}), "k must be an int"),
        (("topk", {"ratio": "0.1"}), "ratio must be a number"),
        (("topk", {"k": 1, "values": 16}), "values must be one of"),
        (("int8", [("block", 3)]), "params must be a mapping"),
        (("nope", {}), "unknown codec 'nope'.*known codecs"),
        (("int8", {}, "lz4"), "unknown post-processing 'lz4'"),
    ):
        with pytest.raises(ValueError, match=match):
            CodecSpec(*args)
    with pytest.raises(ValueError, match="must be a str"):
        CodecSpec.parse(8)  # type: ignore[arg-type]


_SPECS = st.one_of(
    st.sampled_from(["fp32", "raw", "lz4", "fp16", "bf16"]).map(lambda n: CodecSpec(n)),
    st.builds(
        lambda n, b, p: CodecSpec(n, {} if b is None else {"block": b}, p),
        st.sampled_from(["int8", "int4"]),
        st.none() | st.integers(1, 2**31 - 1),
        st.sampled_from([None, "shuffle-lz4"]),
    ),
    st.builds(
        lambda kr, v, p: CodecSpec("topk", {**kr, **({} if v is None else {"values": v})}, p),
        st.integers(1, 10**9).map(lambda k: {"k": k})
        | st.floats(min_value=1e-12, max_value=1.0, exclude_min=False).map(lambda r: {"ratio": r}),
        st.sampled_from([None, "fp16", "fp32"]),
        st.sampled_from([None, "shuffle-lz4"]),
    ),
)


@FAST
@given(spec=_SPECS)
def test_spec_roundtrip_property(spec: CodecSpec) -> None:
    assert CodecSpec.parse(str(spec)) == spec
    assert str(CodecSpec.parse(str(spec))) == str(spec)
