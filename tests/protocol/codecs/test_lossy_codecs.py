"""Every lossy codec through the wire: round trips, lossless fallbacks, sizes, and which tensors get which codec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.protocol.codecs import CodecSpec, blockwise, topk_dense
from shared.protocol.wire import Message, decode, encode

from codec_helpers import FLOATS, LOSSY, SHAPES, check_bounds, entry_of, roundtrip, sample

# ----------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", list(FLOATS.values()), ids=list(FLOATS))
@pytest.mark.parametrize("spec", LOSSY)
def test_roundtrip_every_codec_shape_dtype(spec: str, dtype: torch.dtype) -> None:
    cs = CodecSpec.parse(spec)
    for i, shape in enumerate(SHAPES):
        x = sample(shape, dtype, seed=i, distinct=cs.name == "topk")
        out, e, _ = roundtrip(x, spec)
        check_bounds(cs, x, out, e)
        assert e["dtype"] == str(dtype).removeprefix("torch.") and e["shape"] == shape
        if x.numel():
            out.add_(1)  # decoded tensors are writable


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "int8:block=7", "int8:channels=none", "int4", "int4:block=5"])
def test_one_torch_thread_and_chunks_give_the_same_bits(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch runs one thread the codecs make one call per pass, else they work in chunks below torch's grain
    (``shared.protocol.codecs.arrays``): both encode the same bytes and decode the same values, past the chunks'
    boundaries (over 32768 elements), on partial blocks, with channel scales, tiny and huge values. (The int
    codecs' Python path, without their compiled loop: ``test_blockwise_kernel.py`` compares the two.)"""
    monkeypatch.setattr(blockwise, "kernel", None)
    shapes = [[70_000], [300, 384], [130, 5], [65], [0]]
    prior = torch.get_num_threads()
    try:
        for i, shape in enumerate(shapes):
            for dtype in FLOATS.values():
                for scale in (1e-30, 1.0, 1e30):
                    x = (sample(shape, torch.float32, seed=i) * scale).to(dtype)
                    if x.numel() > 9:
                        x.view(-1)[3:9] = 0  # a zero run: a zero block for small blocks
                    if x.numel() >= 128:
                        x.view(-1)[64:128] = -0.0  # a block of negative zeros
                    msg = Message("m", tensors={"x": x})
                    seen = []
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        data = encode(msg, tensor_codecs={"x": spec})
                        seen.append((data, decode(data).tensors["x"]))
                    assert seen[0][0] == seen[1][0], (shape, dtype, scale)
                    assert torch.equal(seen[0][1], seen[1][1]), (shape, dtype, scale)
    finally:
        torch.set_num_threads(prior)


def test_lossy_falls_back_to_lossless_when_unrepresentable() -> None:
    x = torch.randn(300)
    x[7] = float("nan")
    for spec in ("int8", "int4"):
        out, e, _ = roundtrip(x, spec)
        assert e["codec"] in ("lz4", "raw")
        assert torch.equal(out.view(torch.int32), x.view(torch.int32))
    big = torch.randn(300) * 1e6  # finite values that overflow fp16
    out, e, _ = roundtrip(big, "fp16")
    assert e["codec"] in ("lz4", "raw") and torch.equal(out, big)
    out, e, _ = roundtrip(torch.tensor([1e300, 1.0], dtype=torch.float64), "bf16")
    assert e["codec"] in ("lz4", "raw")
    # topk carries specials as values; fp16 values switch to float32 when they would overflow
    out, e, _ = roundtrip(big, "topk:k=5,values=fp16")
    assert e["value_dtype"] == "float32"
    assert torch.equal(out, topk_dense(big, 5))


def test_compression_ratios_on_activation_tensor() -> None:
    x = sample([8, 128, 576], torch.float32, 11)
    raw = x.numel() * 4
    sizes = {s: len(encode(Message("k", tensors={"h": x}), tensor_codecs={"h": s})) for s in ("int8", "int4", "fp16", "bf16")}
    assert raw / sizes["int8"] >= 3.5
    assert raw / sizes["int4"] >= 6
    assert raw / sizes["fp16"] >= 1.99 and raw / sizes["bf16"] >= 1.99
    small = len(encode(Message("k", tensors={"h": x}), tensor_codecs={"h": "topk:ratio=0.01"}))
    assert raw / small > 40


# ----------------------------------------------------------------------------------- selection


def test_integer_and_bool_tensors_stay_exact_even_if_listed() -> None:
    tensors = {
        "mask": torch.arange(500) % 3 == 0,
        "labels": torch.randint(-1000, 1000, (40, 13)),
        "ids": torch.arange(300, dtype=torch.int32),
        "small": torch.tensor([1, -2, 3], dtype=torch.int8),
        "u": torch.arange(256, dtype=torch.uint8),
        "hidden": torch.randn(4, 64),
    }
    listed = {"mask": "int8", "labels": "topk:k=1", "ids": "fp16", "small": "int4", "u": "bf16", "hidden": "int8"}
    for kwargs in ({"tensor_codecs": listed}, {"codec": "int4", "tensor_codecs": listed}, {"codec": "int8"}):
        data = encode(Message("k", tensors=tensors), **kwargs)
        out = decode(data)
        for name, t in tensors.items():
            e = entry_of(data, name)
            if name == "hidden":
                assert e["codec"] in ("int8", "int4")
            else:
                assert e["codec"] in ("lz4", "raw"), (name, e["codec"])
                assert out.tensors[name].dtype == t.dtype and torch.equal(out.tensors[name], t)
    raw = encode(Message("k", tensors=tensors), codec="raw", tensor_codecs={"labels": "int8"})
    assert entry_of(raw, "labels")["codec"] == "raw"  # the lossless fallback follows a lossless default


def test_message_codecs_policy_and_override() -> None:
    h, g, ids = torch.randn(16, 64), torch.randn(16, 64), torch.arange(400)
    msg = Message("fwd", tensors={"hidden": h, "grad": g, "ids": ids}, codecs={"hidden": "int8", "grad": "topk:ratio=0.05"})
    data = encode(msg)
    assert entry_of(data, "hidden")["codec"] == "int8"
    assert entry_of(data, "grad")["codec"] == "topk" and entry_of(data, "grad")["k"] == 52
    assert entry_of(data, "ids")["codec"] == "lz4"
    out = decode(data)
    assert out.codecs == {} and out.tensors["grad"].count_nonzero() == 52
    # explicit tensor_codecs replaces the message's policy entirely
    data = encode(msg, tensor_codecs={"grad": CodecSpec.parse("fp16")})
    assert entry_of(data, "grad")["codec"] == "fp16"
    assert entry_of(data, "hidden")["codec"] in ("lz4", "raw")
    # names that are not in the message are ignored; specs are still validated
    assert decode(encode(Message("k"), tensor_codecs={"absent": "int4"})).tensors == {}
    with pytest.raises(ValueError, match="unknown codec 'int9'.*known codecs: fp32"):
        encode(Message("k", tensors={"x": h}), tensor_codecs={"x": "int9"})
    with pytest.raises(ValueError, match="unknown codec"):
        encode(Message("k", tensors={"x": h}, codecs={"x": "zstd"}))
    with pytest.raises(TypeError):
        encode(Message("k", tensors={"x": h}), tensor_codecs={"x": 8})
    # fp32 / lz4 / raw specs are the lossless paths
    assert entry_of(encode(Message("k", tensors={"x": h}), tensor_codecs={"x": "fp32"}))["codec"] in ("lz4", "raw")
    assert entry_of(encode(Message("k", tensors={"x": h}), tensor_codecs={"x": "raw"}))["codec"] == "raw"
    assert entry_of(encode(Message("k", tensors={"x": h}), codec="int8:block=32"))["block"] == 32


# ----------------------------------------------------------------------------------- layering

REPO_ROOT = Path(__file__).resolve().parents[3]


def _run(code: str, stdin: str = "") -> str:
    r = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, cwd=REPO_ROOT,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_importing_the_wire_alone_decodes_every_lossy_codec() -> None:
    x = sample([70, 16], torch.float32, 4)
    specs = ["fp16", "bf16", "int8", "int4", "topk:k=5", "int8:channels=none+shuffle-lz4"]
    blobs = [encode(Message("k", tensors={"x": x}), tensor_codecs={"x": s}) for s in specs]
    assert [entry_of(b)["codec"] for b in blobs] == ["fp16", "bf16", "int8", "int4", "topk", "int8"]
    out = _run(
        "import sys\n"
        "from shared.protocol.wire import decode\n"
        "for line in sys.stdin:\n"
        "    t = decode(bytes.fromhex(line)).tensors['x']\n"
        "    print(t.dtype, list(t.shape))\n",
        "\n".join(b.hex() for b in blobs),
    )
    assert out.splitlines() == ["torch.float32 [70, 16]"] * len(specs)


def test_layers_import_downwards_only() -> None:
    """tensors <- codecs <- wire <- measure: importing a layer never imports the ones above it."""
    _run(
        "import sys\n"
        "import shared.protocol.tensors\n"
        "assert not {'shared.protocol.codecs', 'shared.protocol.wire'} & set(sys.modules), sorted(sys.modules)\n"
        "import shared.protocol.codecs\n"
        "assert 'shared.protocol.wire' not in sys.modules\n"
        "from shared.protocol.tensors import codecs\n"
        "assert codecs() == ('raw', 'lz4', 'fp16', 'bf16', 'int8', 'int4', 'topk'), codecs()\n"
        "import shared.protocol.wire\n"
        "assert 'shared.protocol.measure' not in sys.modules\n"
    )
