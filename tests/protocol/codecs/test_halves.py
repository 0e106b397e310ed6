"""The fp16 and bf16 codecs (shared.protocol.codecs.halves)."""

from __future__ import annotations

import torch

from codec_helpers import roundtrip, sample


def test_half_codecs_are_bit_exact_casts() -> None:
    x = sample([40, 33], torch.float32, 3)
    assert torch.equal(roundtrip(x, "fp16")[0], x.half().float())
    assert torch.equal(roundtrip(x, "bf16")[0], x.bfloat16().float())
    # a half tensor with the matching codec is sent as is
    h = x.half()
    assert torch.equal(roundtrip(h, "fp16")[0].view(torch.int16), h.view(torch.int16))
    b = x.bfloat16()
    assert torch.equal(roundtrip(b, "bf16")[0].view(torch.int16), b.view(torch.int16))
    # specials survive the casts
    sp = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-30, 3.0])
    for spec, cast in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out, e, _ = roundtrip(sp, spec)
        assert e["codec"] == spec
        assert torch.equal(out.isnan(), sp.isnan())
        assert torch.equal(out[1:], sp[1:].to(cast).float())
        assert torch.signbit(out[3])


def test_half_codecs_send_losslessly_only_what_would_overflow() -> None:
    # float32 values just below the rounding boundary become the largest finite half / bfloat16; at it, infinity.
    # The encoder checks the cast's result (no all-ones exponent) over the whole tensor, past its first chunks.
    boundaries = {"fp16": (torch.float16, 65520.0),
                  "bf16": (torch.bfloat16, float(torch.tensor(0x7F7F8000, dtype=torch.int32).view(torch.float32)))}
    for spec, (cast, edge) in boundaries.items():
        below = float(torch.nextafter(torch.tensor(edge), torch.tensor(0.0)))
        for sign in (1.0, -1.0):
            x = torch.randn(100_000)
            x[-3] = sign * below
            out, e, _ = roundtrip(x, spec)
            assert e["codec"] == spec
            assert torch.equal(out, x.to(cast).float()) and out[-3].isfinite()
            x[-3] = sign * edge
            out, e, _ = roundtrip(x, spec)
            assert e["codec"] in ("lz4", "raw")  # a finite value would become inf: sent as it is
            assert torch.equal(out, x)
