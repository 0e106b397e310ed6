"""Issue 12's "500s where 4xx is promised" and "lenient round API" findings, replayed against the in-process
deployment's real HTTP routes: every one is now a 4xx with a reason."""

from __future__ import annotations

import pytest
import torch

from shared.protocol.wire import Message, encode
from stack_helpers import Stack, bearer, inprocess_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with inprocess_stack(tmp_path_factory.mktemp("validation")) as s:
        yield s


def step_with(stack: Stack, round_id: int, **change: torch.Tensor | str) -> Message:
    msg = stack.step_message(round_id, 0)
    for name, value in change.items():
        if name == "mode":
            msg.meta["mode"] = value
        else:
            msg.tensors[name] = value
    return msg


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_a_float64_activation_is_422_not_500(stack: Stack, tier: str) -> None:
    stack.open_sessions(101 if tier == "edge" else 102)
    msg = step_with(stack, 101 if tier == "edge" else 102)
    msg.tensors["hidden"] = msg.tensors["hidden"].double()
    r = stack.post_msg(tier, "step", msg)
    assert r.status_code == 422 and "hidden must be float32" in r.json()["detail"], r.text


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_an_out_of_range_label_is_422_at_either_tier_not_500_or_502(stack: Stack, tier: str) -> None:
    rid = 103 if tier == "edge" else 104
    stack.open_sessions(rid)
    r = stack.post_msg(tier, "step", step_with(stack, rid, labels=torch.tensor([0, 99])))
    assert r.status_code == 422 and "labels must lie in [0, " in r.json()["detail"], r.text
    assert "http://" not in r.text  # no internal URL in any answer


def test_a_bogus_mode_is_422(stack: Stack) -> None:
    stack.open_sessions(105)
    r = stack.post_msg("edge", "step", step_with(stack, 105, mode="bogus"))
    assert r.status_code == 422 and "mode must be one of train, eval" in r.json()["detail"], r.text


@pytest.mark.parametrize("meta", [{}, {"plans": "x"}, {"plans": []}, {"plans": [{"round_id": 1}]}, {"plan": {}}])
def test_a_start_with_a_bad_body_is_422_with_a_reason(stack: Stack, meta: dict) -> None:
    r = stack.post_msg("edge", "start", Message("start", meta))
    assert r.status_code == 422, r.text
    assert r.json()["detail"] not in ("plans", "'plans'")  # a reason, not an exception's text


@pytest.mark.parametrize("body, reason", [
    ({"local_steps": 2, "loacl_steps": 3}, "loacl_steps"),  # an unknown (misspelt) field
    ({"participants": ["user-0", "nobody"]}, "unknown participants ['nobody']"),
    ({"algorithm": "fedara"}, "fedara trains truncated-SVD adapters"),
    ({"algorithm": "nope"}, "unknown algorithm 'nope'"),
    ({"aggregator": "max"}, "aggregator"),
    ({"algorithm": "devft", "config": {"layers": [3]}}, "must end at the model's full depth, 4 layers"),
    ({"algorithm": "devft", "config": {"layers": [3, 5]}}, "stage 2 has 5 layers, more than the model's 4"),
    ({"algorithm": "devft", "config": {"layers": [4, 3]}}, "stages must grow"),
    ({"algorithm": "devft", "config": {"layers": [2, 4]}}, "each needs at least one representative"),
])
def test_the_round_api_refuses_at_submit(stack: Stack, body: dict, reason: str) -> None:
    before = stack.clients["cloud"].get("/v1/rounds", headers=bearer(stack.admin)).json()["rounds"]
    r = stack.clients["cloud"].post("/v1/rounds", json=body, headers=bearer(stack.admin))
    assert r.status_code == 422 and reason in r.text, r.text
    assert stack.clients["cloud"].get("/v1/rounds", headers=bearer(stack.admin)).json()["rounds"] == before


@pytest.mark.parametrize("version", ["00001", "+1", "1_0", "-1", "1e3", " 1"])
def test_versions_and_round_ids_are_plain_decimal_numbers(stack: Stack, version: str) -> None:
    for path in (f"/v1/adapters/{version}", f"/v1/rounds/{version}"):
        r = stack.clients["cloud"].get(path, headers=bearer(stack.admin))
        assert r.status_code == 422, (path, r.status_code, r.text)
    assert stack.clients["cloud"].get("/v1/adapters/0", headers=bearer(stack.admin)).status_code == 200


def test_an_out_of_range_label_in_a_relayed_step_never_reaches_the_cloud(stack: Stack) -> None:
    """The edge checks labels itself: the cloud's refusal used to come back as a 502 naming the cloud's URL."""
    stack.open_sessions(106)
    calls = []
    real = stack.edge.cloud.request
    stack.edge.cloud.request = lambda endpoint, msg: calls.append(endpoint) or real(endpoint, msg)
    try:
        r = stack.post_msg("edge", "step", step_with(stack, 106, labels=torch.tensor([-3, 0])))
    finally:
        stack.edge.cloud.request = real
    assert r.status_code == 422 and calls == []
    assert encode(Message("x")) is not None


def test_a_users_claimed_step_count_moves_only_the_user_tiers_blocks_per_step() -> None:
    from cloud_server.metrics import compute_metrics

    honest = {"steps": 4, "user_blocks_run": 8, "edge_blocks_run": 8, "edge_steps": 4}
    cloud = {"u0": {"seconds": 1.0, "blocks_run": 12, "steps": 4}, "u1": {"seconds": 1.0, "blocks_run": 12, "steps": 4}}
    forged = compute_metrics({"u0": honest, "u1": {**honest, "steps": 10**9}}, cloud)["blocks_per_step"]
    assert forged["edge"] == 2.0 and forged["cloud"] == 3.0  # the edge's and the cloud's own counts
    assert forged["user"] < 2.0  # the user tier's figure is the users' own


@pytest.mark.parametrize("tier", ["edge", "cloud"])
@pytest.mark.parametrize("batch, seq, reason", [
    (16, 8, "a step of this session holds at most 2 examples; got 16"),  # the plan's batch_size is 2
    (1, 600, "a sequence is at most 512 tokens (the model's positions); got 600"),
])
def test_a_step_larger_than_its_plan_or_the_models_positions_is_422(stack: Stack, tier: str, batch: int, seq: int,
                                                                    reason: str) -> None:
    """Attention costs the square of a sequence: one user's step of a 100k-token sequence (within the body cap)
    used to hold the edge's and the cloud's CPUs for minutes. A step is refused before any block runs."""
    rid = 110 + (tier == "cloud") * 2 + (seq > 8)
    sessions = stack.open_sessions(rid)
    msg = stack.step_message(rid, 0, batch=batch, seq=seq)
    r = stack.post_msg(tier, "step", msg)
    assert r.status_code == 422 and r.json()["detail"] == reason, r.text
    assert all(s.steps == 0 and s.last_step == -1 for s in sessions.values())
    assert stack.post_msg(tier, "step", stack.step_message(rid, 0)).status_code == 200  # nothing left behind


def test_an_evaluation_step_may_hold_the_users_evaluation_batch(stack: Stack) -> None:
    from shared.data.batching import EVAL_BATCH_SIZE

    stack.open_sessions(116, mode="eval")
    r = stack.post_msg("edge", "step", stack.step_message(116, 0, mode="eval", batch=EVAL_BATCH_SIZE))
    assert r.status_code == 200, r.text
    r = stack.post_msg("edge", "step", stack.step_message(116, 1, mode="eval", batch=EVAL_BATCH_SIZE + 1))
    assert r.status_code == 422 and f"at most {EVAL_BATCH_SIZE} examples" in r.json()["detail"], r.text
