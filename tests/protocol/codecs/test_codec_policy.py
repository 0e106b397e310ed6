"""CodecPolicy and ErrorFeedback (shared.protocol.codecs.policy)."""

from __future__ import annotations

import pytest
import torch

from shared.protocol.codecs import CodecPolicy, CodecSpec, ErrorFeedback, topk_dense

from codec_helpers import roundtrip, sample

# ----------------------------------------------------------------------------------- policy


def test_codec_policy() -> None:
    p = CodecPolicy()
    assert p.to_dict() == {"activations": "fp32", "gradients": "fp32", "uploads": "fp32", "downloads": "fp32"}
    d = {"activations": "int8:block=128", "gradients": "topk:ratio=0.01", "uploads": "bf16+shuffle-lz4", "downloads": "fp16"}
    q = CodecPolicy.from_dict(d)
    assert q.to_dict() == d and CodecPolicy.from_dict(q.to_dict()) == q
    assert q.spec("gradients") == CodecSpec("topk", {"ratio": 0.01})
    assert CodecPolicy.from_dict({"activations": "int4"}).gradients == "fp32"
    assert CodecPolicy.from_dict(None) == CodecPolicy()
    assert CodecPolicy(activations=CodecSpec.parse("int8")).activations == "int8"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="codec policy 'activations': unknown codec 'int9'.*known codecs"):
        CodecPolicy(activations="int9")
    with pytest.raises(ValueError, match="codec policy 'gradients': .*exactly one of"):
        CodecPolicy.from_dict({"gradients": "topk"})
    with pytest.raises(ValueError, match="unknown field.*'weights'"):
        CodecPolicy.from_dict({"weights": "fp16"})
    with pytest.raises(ValueError, match="must be a codec spec str"):
        CodecPolicy(uploads=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a mapping"):
        CodecPolicy.from_dict(["fp16"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q.downloads = "fp8"  # assignment is validated too
    with pytest.raises(ValueError, match="no field"):
        q.spec("weights")


# ----------------------------------------------------------------------------------- error feedback


def test_error_feedback_tracks_the_true_sum() -> None:
    g = torch.Generator().manual_seed(0)
    n, k, steps = 500, 25, 300
    drift = torch.randn(n, generator=g) * 0.1
    ef = ErrorFeedback()
    true_sum, sent_sum, plain_sum = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    res_norms = []
    for _ in range(steps):
        grad = drift + torch.randn(n, generator=g)
        sent = ef.compress("grad", grad, k)
        assert sent.dtype == grad.dtype and int(sent.count_nonzero()) <= k
        true_sum += grad
        sent_sum += sent
        plain_sum += topk_dense(grad, k)
        res_norms.append(float(ef.residual("grad").norm()))
    # identity: what was not sent yet is exactly the residual
    assert torch.allclose(sent_sum + ef.residual("grad"), true_sum, atol=1e-3)
    # the residual stays bounded (no growth over time) and the sent sum tracks the true sum
    assert max(res_norms[steps // 2 :]) <= 1.5 * max(res_norms[: steps // 2])
    assert float((true_sum - sent_sum).norm()) < 0.1 * float(true_sum.norm())
    assert float((true_sum - plain_sum).norm()) > 0.5 * float(true_sum.norm())  # without feedback it drifts


def test_error_feedback_output_is_what_the_receiver_reconstructs() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ef = ErrorFeedback()
        for step in range(3):
            grad = sample([6, 50], dtype, seed=step)
            for values in ("fp32", "fp16"):
                sent = ef.compress(("g", values), grad, 17, values=values)
                out, e, _ = roundtrip(sent, f"topk:k=17,values={values}")
                assert torch.equal(out, sent), (dtype, values)
    ef = ErrorFeedback()
    s = ef.compress("a", torch.randn(1000), ratio=0.01)
    assert int(s.count_nonzero()) == 10 and "a" in ef and len(ef) == 1
    ef.compress("a", torch.randn(10), 3)  # shape changed: the old residual is dropped
    assert ef.residual("a").shape == (10,)
    ef.reset("a")
    assert ef.residual("a") is None
    with pytest.raises(TypeError):
        ef.compress("i", torch.arange(5), 1)
