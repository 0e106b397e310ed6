"""The int8 and int4 codecs' compiled loop (``shared/protocol/codecs/_blockwise.c``) against their numpy and torch
path: the same bytes out of the encoder and the same values out of the decoder, on any tensor; the loop is built
wherever a C compiler is; its arguments are checked."""

from __future__ import annotations

import shutil
import sysconfig
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from codec_helpers import FAST, FLOATS, sample
from hypothesis import given
from hypothesis import strategies as st

from shared.protocol.codecs import blockwise
from shared.protocol.wire import Message, decode, encode

needs_kernel = pytest.mark.skipif(blockwise.kernel is None, reason="the compiled loop is not built here")
SPECS = ["int8", "int8:channels=none", "int8:block=7", "int8:block=1", "int4", "int4:block=5", "int8:block=16+shuffle-lz4"]


@pytest.fixture
def python_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The codecs without the compiled loop, for one test."""
    monkeypatch.setattr(blockwise, "kernel", None)
    yield


def _both(x: torch.Tensor, spec: str, threads: int = 1) -> tuple[tuple[bytes, torch.Tensor], tuple[bytes, torch.Tensor]]:
    """(bytes, decoded) with the compiled loop, then with the Python path (on ``threads`` torch threads); each
    decoder is also given the other's bytes, so that a difference on either side shows."""
    msg = Message("m", tensors={"x": x})
    compiled = encode(msg, tensor_codecs={"x": spec})
    out_c = decode(compiled).tensors["x"]
    prior, kernel = torch.get_num_threads(), blockwise.kernel
    try:
        blockwise.kernel = None
        torch.set_num_threads(threads)
        python = encode(msg, tensor_codecs={"x": spec})
        out_p = decode(compiled).tensors["x"]
    finally:
        blockwise.kernel = kernel
        torch.set_num_threads(prior)
    return (compiled, out_c), (python, out_p)


def _same(x: torch.Tensor, spec: str, threads: int = 1) -> None:
    (cb, co), (pb, po) = _both(x, spec, threads)
    assert cb == pb, (spec, list(x.shape), x.dtype)
    assert co.dtype == po.dtype and co.shape == po.shape
    assert torch.equal(_bytes(co), _bytes(po))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as bytes (NaNs compare equal), whatever its strides."""
    return torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1)).view(torch.uint8)


def test_the_loop_is_built_where_a_c_compiler_is() -> None:
    """``pip install`` (``make setup``) builds it; the extension is optional, so a failed build would only show
    here, as a codec slower than the figures in the README."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here")
    assert blockwise.kernel is not None


@needs_kernel
@FAST
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    dtype=st.sampled_from(list(FLOATS.values())),
    spec=st.sampled_from(SPECS),
    exponent=st.sampled_from([-140, -60, -20, 0, 20, 60, 120]),
    seed=st.integers(0, 2**16),
)
def test_same_bits_as_the_python_path(shape: list[int], dtype: torch.dtype, spec: str, exponent: int,
                                      seed: int) -> None:
    x = sample(shape, torch.float64, seed) * 2.0**exponent
    _same(x.to(dtype), spec)


@needs_kernel
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("threads", [1, 2])
def test_same_bits_with_channel_scales_and_awkward_blocks(spec: str, threads: int) -> None:
    """Shapes with 64+ rows (so that rms channel scaling applies), widths that blocks straddle, chunks of the
    loop's buffer (4096 elements) cut mid-row, zero and negative-zero blocks, magnitudes from subnormal to huge
    spread over one tensor, and the fp16 and bf16 inputs the encoder widens first."""
    g = torch.Generator().manual_seed(3)
    for shape in ([64, 5], [70, 384], [130, 7], [65, 3, 2], [4100], [300, 61]):
        n = int(np.prod(shape))
        mags = torch.pow(2.0, torch.randint(-149, 127, (n,), generator=g).to(torch.float64))
        for x in (sample(shape, torch.float32, seed=n), (torch.randn(n, dtype=torch.float64, generator=g) * mags)
                  .clamp(-3e38, 3e38).to(torch.float32).reshape(shape)):
            x = x.clone()
            x.view(-1)[3:9] = 0
            if n >= 128:
                x.view(-1)[64:128] = -0.0
            for dtype in FLOATS.values():
                _same(x.to(dtype), spec, threads)


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_not_finite_goes_lossless_on_both(bad: float) -> None:
    x = torch.randn(200, 64)
    x[150, 3] = bad
    (cb, co), (pb, po) = _both(x, "int8")
    assert cb == pb
    assert torch.equal(co.view(torch.int32), x.view(torch.int32)) and torch.equal(po.view(torch.int32), x.view(torch.int32))


def test_python_path_still_round_trips(python_path: None) -> None:
    x = sample([100, 64], torch.float32, seed=1)
    out = decode(encode(Message("m", tensors={"x": x}), tensor_codecs={"x": "int8"})).tensors["x"]
    assert float((out - x).abs().max()) <= float(x.abs().max()) / 127


@needs_kernel
def test_arguments_are_checked() -> None:
    k = blockwise.kernel
    x, cs = np.ones(128, np.float32), np.ones(64, np.float32)
    q, amax = np.empty(128, np.int8), np.empty(2, np.float32)
    assert k.quantise(x, cs, 64, 64, 127, q, amax) is True
    with pytest.raises(ValueError, match="block"):
        k.quantise(x, None, 0, 0, 127, q, amax)
    with pytest.raises(ValueError, match="q: 127 bytes"):
        k.quantise(x, None, 0, 64, 127, q[:127], amax)
    with pytest.raises(ValueError, match="amax"):
        k.quantise(x, None, 0, 64, 127, q, np.empty(3, np.float32))
    with pytest.raises(ValueError, match="channel_scales"):
        k.quantise(x, cs[:63], 64, 64, 127, q, amax)
    with pytest.raises(ValueError, match="width"):
        k.quantise(x, cs, 0, 64, 127, q, amax)
    with pytest.raises(ValueError, match="float32"):
        k.quantise(np.ones(3, np.uint8), None, 0, 64, 127, np.empty(0, np.int8), np.empty(0, np.float32))
    read_only = np.empty(128, np.int8)
    read_only.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        k.quantise(x, None, 0, 64, 127, read_only, amax)
    out = np.empty(128, np.float32)
    assert k.dequantise(q, np.ones(2, np.float32), None, 0, 64, out) is None
    with pytest.raises(ValueError, match="out"):
        k.dequantise(q, np.ones(2, np.float32), None, 0, 64, out[:100])
    with pytest.raises(ValueError, match="scales"):
        k.dequantise(q, np.ones(1, np.float32), None, 0, 64, out)
    with pytest.raises(TypeError):
        k.dequantise(q, np.ones(2, np.float32), None, 0, 64)
