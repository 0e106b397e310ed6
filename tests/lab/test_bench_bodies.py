"""``splitllm bench memory-bodies``: a real edge under four concurrent maximum-size step bodies stays within 1.5x
their total and gives the memory back; a fifth body at once gets 503 with Retry-After; a chunked body over the
limit gets 413 once past it, and its memory back too."""

from __future__ import annotations

import sys

import pytest

from shared.lab.bench.bodies import MiB, bench_memory_bodies, step_body
from shared.protocol.messages import StepRequest
from shared.protocol.wire import decode


def test_the_bench_body_is_a_valid_step_just_under_the_limit() -> None:
    body = step_body(width=32, max_bytes=MiB, max_elements=64 * MiB, batch=16)
    assert MiB - 8192 < len(body) <= MiB
    step = StepRequest.from_message(decode(body, max_bytes=MiB))
    assert list(step.hidden.shape) == [int(step.attention_mask.sum()), 32] and step.labels.shape == (16,)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_four_maximum_size_bodies_cost_at_most_1_5x_and_are_given_back() -> None:
    r = bench_memory_bodies(max_message_bytes=64 * MiB, bursts=2)  # 64 MiB bodies: the same paths, less time
    print({k: r[k] for k in ("peak_ratio", "after_ratio")})
    for burst in r["bursts"]:
        assert burst["statuses"] == [404] * 4  # each body read and decoded in full, then: no such session
    assert r["peak_ratio"] <= 1.5
    assert r["after_ratio"] <= 0.05, "the bodies' memory was not given back"
    over = r["over_budget"]
    assert over["statuses"] == [404] * 4 + [503] and over["peak_over_idle"] <= 1.5
    refused = next(x for x in over["replies"] if x["status"] == 503)
    assert float(refused["retry_after"]) > 0 and "max_inflight_bytes" in refused["detail"]
    chunked = r["chunked_over_limit"]
    assert chunked["statuses"] == [413] and chunked["peak_over_idle"] <= 1.5 and chunked["after_over_idle"] <= 0.05
