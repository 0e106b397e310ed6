"""A tier's ``autocast`` setting: matmuls in bfloat16, everything that leaves the tier or is trained in float32."""

from __future__ import annotations

import pytest
import torch

from plans import make_plan
from shared.config.deployment import ModelSpec
from shared.config.settings import ServiceSettings
from shared.model.adapters import initial_state
from shared.runtime.tier import TierRuntime


def one_step(tiny, tier: str, autocast: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A training forward and backward of fixed activations through the edge's blocks (the cloud's: and head)."""
    runtime = TierRuntime(tier, tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"), autocast=autocast)
    session = runtime.open_session(make_plan(round_id=1, user_id="u"), initial_state(runtime.slots.shapes(), 0))
    for p in session.params.values():  # B = 0 at the start: give every adapter a part in the output
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    width = runtime.width
    hidden = torch.randn(2, 6, width, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.int64)
    out = runtime.forward(session, hidden, mask, 0)
    if tier == "cloud":
        out = runtime.head(session, out, mask)
    assert out.dtype == torch.float32  # what is sent on, or what the loss is taken on
    runtime.backward(session, [out], [torch.ones_like(out)])
    grads = {k: p.grad for k, p in session.params.items()}
    assert hidden.grad.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    assert all(p.dtype == torch.float32 for p in session.params.values())
    return out.detach(), hidden.grad, grads


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_bf16_autocast_computes_in_bf16_and_keeps_float32_outside(tiny, tier: str) -> None:
    out, grad_in, grads = one_step(tiny, tier, "off")
    out_bf, grad_in_bf, grads_bf = one_step(tiny, tier, "bf16")
    assert not torch.equal(out, out_bf)  # the matmuls did run in bfloat16
    # ... to bfloat16's precision (8 bits of mantissa), relative to each tensor's scale
    assert (out_bf - out).norm() <= 3e-2 * out.norm()
    assert (grad_in_bf - grad_in).norm() <= 5e-2 * grad_in.norm()
    for key, g in grads.items():
        assert (grads_bf[key] - g).norm() <= 5e-2 * g.norm(), key


def test_autocast_settings_are_checked() -> None:
    assert ServiceSettings().autocast == "off"
    assert ServiceSettings(autocast="bf16").autocast == "bf16"
    with pytest.raises(ValueError, match="autocast"):
        ServiceSettings(autocast="fp16")  # float16 would need loss scaling across the tiers


def test_a_runtime_refuses_an_unknown_autocast(tiny) -> None:
    with pytest.raises(ValueError, match="autocast must be one of off, bf16"):
        TierRuntime("edge", tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"), autocast="fp16")
