"""Pipelined steps: a step's batch in micro-batches gives the unpipelined step's update, and the serving tiers keep
each micro-batch's reply for retries and step the optimizer once per step."""

from __future__ import annotations

import threading

import pytest
import torch

from plans import make_plan
from shared.config.deployment import ModelSpec
from shared.config.round import RoundBody, RoundConfig, merge
from shared.errors import InvalidInput
from shared.lab.sim import SimConfig, Simulation
from shared.model.adapters import initial_state
from shared.protocol.enums import Hop, Mode
from shared.protocol.messages import RoundPlan, StepRequest, TrainReply
from shared.runtime.steps import Downstream, serve_step
from shared.runtime.tier import TierRuntime

CASES = {  # model, data, u_shaped, codecs on both hops
    "tiny-llama/lm": ("tiny-llama", "shakespeare", False, "fp32"),
    "tiny-bert/cls": ("tiny-bert", "trec", False, "fp32"),
    "tiny-llama/u-shaped": ("tiny-llama", "shakespeare", True, "fp32"),
    "tiny-gpt2/topk": ("tiny-gpt2", "shakespeare", False, "activations=fp32,gradients=topk:ratio=0.5"),
}


def snapshot(sim: Simulation) -> dict[str, dict[str, torch.Tensor]]:
    return {t: {k: v.clone() for k, v in s.items()} for t, s in sim.coordinator.global_state.items()}


def trained(case: str, micro_batches: int, batch_size: int = 6) -> tuple[Simulation, dict, dict]:
    """A round of 3 steps of ``batch_size`` rows for two users; the simulation, the adapters before and after."""
    model, data, u_shaped, codecs = CASES[case]
    sim = Simulation(SimConfig(
        model=model, data=data, users=2, edges=1, rounds=1, split=(1, 3), max_len=16, max_examples_per_client=12,
        eval_examples_per_client=2, baseline_eval=False, u_shaped=u_shaped, user_edge_codecs=codecs,
        edge_cloud_codecs=codecs,
        round=RoundConfig(local_steps=3, batch_size=batch_size, micro_batches=micro_batches, evaluate=False)))
    before = snapshot(sim)
    sim.run_round()
    return sim, before, snapshot(sim)


@pytest.mark.parametrize("case", [c for c in CASES if "topk" not in c])
def test_a_pipelined_round_gives_the_unpipelined_update(hermetic_cache, case: str) -> None:
    whole, before, expected = trained(case, 1)
    for micro_batches in (4, 6):  # uneven micro-batches (2, 2, 1, 1) and one row each
        split, _, got = trained(case, micro_batches)
        for tier, state in expected.items():
            moved = max(float((state[k] - v).abs().max()) for k, v in before[tier].items())
            assert moved > 1e-4  # the round trained this tier, or the comparison proves little
            for key, value in state.items():
                torch.testing.assert_close(got[tier][key], value, rtol=0, atol=1e-5, msg=f"{tier} {key}")
        losses = [r.metrics["train_loss"] for r in (whole.coordinator.rounds[1], split.coordinator.rounds[1])]
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_micro_batches_travel_as_one_request_each_and_one_micro_batch_is_todays_message(hermetic_cache) -> None:
    whole, _, _ = trained("tiny-llama/lm", 1)
    split, _, _ = trained("tiny-llama/lm", 3)
    steps = 2 * 3  # two users, three steps
    assert whole.user_links[0].stats.by_endpoint["step"][2] + whole.user_links[2].stats.by_endpoint["step"][2] == steps
    assert sum(split.user_links[i].stats.by_endpoint["step"][2] for i in (0, 2)) == 3 * steps
    request = StepRequest(1, "u", 0, Mode.TRAIN, torch.zeros(2, 4), torch.ones(1, 2, dtype=torch.uint8),
                          torch.zeros(1, 2, dtype=torch.int64))
    assert set(request.to_message().meta) == {"round", "user", "step", "mode"}


def test_top_k_gradients_keep_their_error_feedback_per_micro_batch(hermetic_cache) -> None:
    _, _, state = trained("tiny-gpt2/topk", 3)
    assert all(torch.isfinite(v).all() for s in state.values() for v in s.values())


def test_micro_batches_must_fit_the_batch() -> None:
    with pytest.raises(ValueError, match="must not exceed batch_size"):
        RoundConfig(batch_size=2, micro_batches=3)
    with pytest.raises(InvalidInput, match="must not exceed plan.batch_size"):
        RoundPlan.from_meta({**make_plan().to_meta(), "micro_batches": 3})
    # a round body whose fields are each valid but not together (with the cloud's defaults): 422, not a 500
    with pytest.raises(InvalidInput, match="must not exceed batch_size"):
        merge(RoundBody(batch_size=1, micro_batches=2), RoundConfig())
    assert "micro_batches" not in make_plan().to_meta() and make_plan(micro_batches=2).to_meta()["micro_batches"] == 2


# -- the serving tier's side ------------------------------------------------------------------------------------

WIDTH = 32


@pytest.fixture()
def edge(tiny) -> TierRuntime:
    runtime = TierRuntime("edge", tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"))
    runtime.open_session(make_plan(round_id=1, user_id="u", batch_size=4, micro_batches=2),
                         initial_state(runtime.slots.shapes(), 0))
    return runtime


def micro_request(step: int, micro: int, count: int = 2) -> StepRequest:
    mask = torch.ones(2, 2, dtype=torch.uint8)
    return StepRequest(1, "u", step, Mode.TRAIN, torch.randn(4, WIDTH), mask, torch.zeros(2, 2, dtype=torch.int64),
                       micro=(micro, count), label_count=8)


def test_the_optimizer_steps_once_the_last_micro_batch_is_done_and_retries_get_their_reply(edge) -> None:
    calls: list[tuple[int, int]] = []

    def next_stage(session, req, out):
        calls.append((req.step, req.micro[0]))
        return Downstream(output=out.square().sum(), loss=0.5)

    session = edge.session(1, "u")
    first = serve_step(edge, micro_request(0, 1).to_message(), next_stage, Hop.USER_EDGE)
    assert session.steps == 0 and session.tracker.open == 0
    with pytest.raises(InvalidInput, match="came while step 0 is still served"):
        serve_step(edge, micro_request(1, 0).to_message(), next_stage, Hop.USER_EDGE)
    with pytest.raises(InvalidInput, match="has 2 micro-batches, not 3"):
        serve_step(edge, micro_request(0, 0, count=3).to_message(), next_stage, Hop.USER_EDGE)
    assert serve_step(edge, micro_request(0, 1).to_message(), next_stage, Hop.USER_EDGE) is first  # a retry
    serve_step(edge, micro_request(0, 0).to_message(), next_stage, Hop.USER_EDGE)
    assert session.steps == 1 and session.tracker.last_step == 0 and calls == [(0, 1), (0, 0)]
    assert TrainReply.from_message(serve_step(edge, micro_request(0, 1).to_message(), next_stage, Hop.USER_EDGE)).loss == 0.5
    serve_step(edge, micro_request(1, 0).to_message(), next_stage, Hop.USER_EDGE)
    with pytest.raises(InvalidInput, match="older than the last step served"):
        serve_step(edge, micro_request(0, 0).to_message(), next_stage, Hop.USER_EDGE)


def test_micro_batches_of_one_step_are_served_at_the_same_time(edge) -> None:
    """Micro-batch 0 waits downstream until micro-batch 1 has been through this tier too: a pipeline."""
    both_here = threading.Barrier(2, timeout=10)

    def next_stage(session, req, out):
        both_here.wait()
        return Downstream(output=out.square().sum(), loss=0.5)

    threads = [threading.Thread(target=serve_step, args=(edge, micro_request(0, m).to_message(), next_stage,
                                                         Hop.USER_EDGE)) for m in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert edge.session(1, "u").steps == 1 and not both_here.broken


def test_a_micro_batch_that_failed_may_be_served_again(edge) -> None:
    def broken(session, req, out):
        raise RuntimeError("downstream failed")

    with pytest.raises(RuntimeError):
        serve_step(edge, micro_request(0, 0).to_message(), broken, Hop.USER_EDGE)
    ok = lambda session, req, out: Downstream(output=out.square().sum(), loss=0.5)  # noqa: E731
    for m in (0, 1):
        serve_step(edge, micro_request(0, m).to_message(), ok, Hop.USER_EDGE)
    assert edge.session(1, "u").steps == 1


def test_a_label_count_below_the_micro_batchs_own_is_refused(edge) -> None:
    request = micro_request(0, 0)
    request.label_count = 1  # two rows of two tokens: 2 labelled next tokens
    with pytest.raises(InvalidInput, match="label_count"):
        serve_step(edge, request.to_message(), lambda *a: Downstream(), Hop.USER_EDGE)
