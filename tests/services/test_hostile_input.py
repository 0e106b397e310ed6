"""Hostile or malformed input at the tiers' msgpack endpoints is refused with 4xx and changes nothing; a bug of
ours (any exception that is not one of the project's ``ServiceError``s) answers 500 with a generic body and
logs its traceback.

The tests drive the real FastAPI apps in-process (``inprocess_stack`` of stack_helpers.py).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import pytest
import torch

from shared.errors import InvalidInput, NotFound
from shared.http.server import INTERNAL_ERROR
from shared.protocol.enums import Mode
from shared.protocol.messages import Report, Update
from shared.protocol.wire import CONTENT_TYPE, Message, encode
from stack_helpers import AcceptingLink, Stack, bearer, inprocess_stack, wait_round, waiting_round


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("hostile")) as s:
        yield s


# -- hostile tensors and updates ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tier", ["cloud", "edge"])
def test_non_finite_activations_get_422_and_change_nothing(stack, tier, bad):
    rid = 300 + (tier == "edge") * 10 + {"nan": 0, "inf": 1, "-inf": 2}[str(bad)]
    sessions = stack.open_sessions(rid)
    before = {t: {k: v.detach().clone() for k, v in s.params.items()} for t, s in sessions.items()}
    msg = stack.step_message(rid, 0)
    msg.tensors["hidden"].view(-1)[7] = bad
    r = stack.post_msg(tier, "step", msg)
    assert r.status_code == 422, r.text
    assert "NaN or Inf" in r.json()["detail"]
    for t, s in sessions.items():
        assert s.steps == 0 and s.last_step == -1
        assert all(torch.equal(before[t][k], v) for k, v in s.params.items())
    # the same step, finite, then goes through: the refusal left no trace
    assert stack.post_msg(tier, "step", stack.step_message(rid, 0)).status_code == 200


def _user_update(stack: Stack, round_id: int) -> Message:
    adapters = {k.split("/", 1)[1]: v + 0.01 for k, v in stack.adapter_tensors("user").items()}
    return Update(round=round_id, user="user-0", mode=Mode.TRAIN, num_samples=8, metrics={"train_loss": 1.0},
                  adapters=adapters).to_message()


def _mutations(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    first = sorted(tensors)[0]
    out = {}
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = {k: v.clone() for k, v in tensors.items()}
        bad[first].view(-1)[0] = value
        out[name] = bad
    out["missing key"] = {k: v for k, v in tensors.items() if k != first}
    out["extra key"] = {**tensors, first.split("/")[0] + "/blocks.0.bogus.weight": torch.zeros(2, 2)}
    out["wrong shape"] = {**tensors, first: torch.zeros(*tensors[first].shape[:-1], tensors[first].shape[-1] + 1)}
    out["transposed"] = {**tensors, first: tensors[first].t().contiguous()} if tensors[first].dim() == 2 \
        and tensors[first].shape[0] != tensors[first].shape[1] else out["wrong shape"]
    out["integer dtype"] = {**tensors, first: torch.zeros(tensors[first].shape, dtype=torch.int64)}
    return out


def test_bad_user_updates_get_422_at_the_edge(stack):
    rid = 400
    users = stack.edge.users
    real = users["user-0"]
    users["user-0"] = AcceptingLink()
    try:
        r = stack.post_msg("edge", "start", stack.edge_start([stack.plan(rid)]))
        assert r.status_code == 200, r.text
        good = _user_update(stack, rid)
        for name, tensors in _mutations(good.tensors).items():
            r = stack.post_msg("edge", "update", Message("update", good.meta, tensors))
            assert r.status_code == 422, (name, r.text)
        pending = stack.edge.pending[(rid, "train")]
        assert pending.metrics == {} and pending.user_updates == [], "a refused update must not be counted"
        assert (rid, "user-0") in stack.edge.runtime.sessions
    finally:
        users["user-0"] = real


def test_a_users_metrics_may_not_fill_the_round_history(stack):
    """A user's metrics went into the round's record as sent: a user could have the cloud store and serve, with every
    read of the round history, megabytes of its own per round (max_message_bytes of them: 256 MB by default)."""
    with waiting_round(stack, deadline=10) as rid:  # the cloud's plan: 2 local steps
        stuffed = _user_update(stack, rid)
        stuffed.meta["metrics"] = {**stuffed.meta["metrics"], "junk": "x" * 6000}
        r = stack.post_msg("edge", "update", stuffed)
        assert r.status_code == 422 and "a round of 2 local steps allows 4160" in r.json()["detail"], r.text
        assert stack.edge.pending[(rid, "train")].metrics == {}
        honest = _user_update(stack, rid)  # per-step figures of the plan's steps fit
        honest.meta["metrics"].update(losses=[1.0, 1.0], step_seconds=[0.5, 0.5], batch_shape=[2, 8], clock="wall")
        r = stack.post_msg("edge", "update", honest)
        assert r.status_code == 200, r.text
    view = wait_round(stack, rid)
    assert view["state"] == "committed" and "junk" not in str(view["metrics"]), view


def _edge_report_meta(round_id: int, edge: str = "edge-0") -> dict[str, Any]:
    """The meta of an edge's training report for ``round_id`` (user-0 reported)."""
    return Report(round=round_id, edge=edge, mode=Mode.TRAIN, num_samples=8,
                  metrics={"user-0": {"train_loss": 1.0}}).to_message().meta


def test_bad_edge_updates_get_422_at_the_cloud(stack):
    tensors = {k: v + 0.01 for k, v in stack.adapter_tensors("user", "edge").items()}
    with waiting_round(stack) as rid:
        meta = _edge_report_meta(rid)
        for name, bad in _mutations(tensors).items():
            r = stack.post_msg("cloud", "update", Message("update", meta, bad))
            assert r.status_code == 422, (name, r.text)
        # an edge reports only as itself (403); an edge the cloud does not know is refused (404)
        r = stack.post_msg("cloud", "update", Message("update", _edge_report_meta(rid, "edge-nobody"), tensors))
        assert r.status_code == 403 and "may not report as edge 'edge-nobody'" in r.json()["detail"], r.text
        stuffed = _edge_report_meta(rid)
        stuffed["metrics"]["user-0"]["junk"] = "x" * 6000
        r = stack.post_msg("cloud", "update", Message("update", stuffed, tensors))
        assert r.status_code == 422 and "edge edge-0's metrics of user user-0 take" in r.json()["detail"], r.text
        body = encode(Message("update", _edge_report_meta(rid, "edge-nobody"), tensors))
        headers = {**stack.issue("edge", "edge-nobody").sign("POST", "/v1/update", "cloud", body),
                   "content-type": CONTENT_TYPE}
        r = stack.clients["cloud"].post("/v1/update", content=body, headers=headers)
        assert r.status_code == 404, r.text
    view = stack.clients["cloud"].get(f"/v1/rounds/{rid}", headers=bearer(stack.admin)).json()
    assert view["state"] == "failed" and view["version"] is None, view  # no refused update got in


def test_an_edge_reports_only_the_users_the_round_started_behind_it(stack):
    """An edge's report used to be taken with metrics for any user: edge-0 could name another edge's user (and then
    weigh as that user too), or users outside the round, and so make a round commit with users that never trained."""
    tensors = {k: v + 0.01 for k, v in stack.adapter_tensors("user", "edge").items()}
    coordinator = stack.cloud.coordinator
    with waiting_round(stack) as rid:
        coordinator.register_edge("edge-1", AcceptingLink())  # another edge, with user-1 behind it
        coordinator.register_user("edge-1", "user-1", 64)
        try:
            for field_, value in (("metrics", {"user-1": {"train_loss": 1.0}}), ("metrics", {"ghost": {"train_loss": 1.0}}),
                                  ("missing", ["user-1"]), ("reasons", {"user-1": "dropped"})):
                meta = _edge_report_meta(rid)
                meta[field_] = {**meta.get(field_, {}), **value} if isinstance(value, dict) else value
                r = stack.post_msg("cloud", "update", Message("update", meta, tensors))
                assert r.status_code == 422, (field_, value, r.text)
                assert "reports users it was not started with" in r.json()["detail"], r.text
        finally:
            for table in (coordinator.edges, coordinator.edge_users, coordinator.edge_deployment):
                table.pop("edge-1", None)
            coordinator.placements.pop("user-1", None)
    view = stack.clients["cloud"].get(f"/v1/rounds/{rid}", headers=bearer(stack.admin)).json()
    assert view["state"] == "failed" and "user-1" not in str(view["metrics"]), view


def test_a_train_update_without_adapters_is_refused(tmp_path):
    with inprocess_stack(tmp_path) as s:
        with waiting_round(s, deadline=10) as rid:  # generous: the forged update must arrive before it
            forged = Message("update", _edge_report_meta(rid))  # a training report without its adapters
            r = s.post_msg("cloud", "update", forged)
        view = wait_round(s, rid)
        sizes = {t: len(state) for t, state in s.cloud.coordinator.global_state.items()}
        assert r.status_code == 422, (r.status_code, view["state"], sizes)
        assert view["state"] == "failed" and all(sizes.values()), (view["state"], sizes)


def test_clip_norm_bounds_the_change_of_a_round(tmp_path):
    """``clip_norm``: no tier's adapters move further than the bound in one round (honest edges)."""
    with inprocess_stack(tmp_path) as s:
        before = {t: {k: v.clone() for k, v in st.items()} for t, st in s.cloud.coordinator.global_state.items()}
        bound = 1e-3
        rid = s.clients["cloud"].post("/v1/rounds", json={"local_steps": 3, "lr": 0.05, "clip_norm": bound,
                                                          "evaluate": False}, headers=bearer(s.admin)).json()["round_id"]
        view = wait_round(s, rid)
        assert view["state"] == "committed", view
        after = s.cloud.coordinator.global_state
        for tier, state in before.items():
            if not state:
                continue
            norm = float(torch.sqrt(sum(((after[tier][k].double() - v.double()) ** 2).sum() for k, v in state.items())))
            assert 0.5 * bound < norm <= bound * (1 + 1e-3), (tier, norm)  # clipped (float32 rounding aside)


def test_preparing_a_round_does_not_build_all_its_batches_up_front(stack, monkeypatch):
    import shared.data.batching as batching

    made = []
    real = batching.collate
    monkeypatch.setattr(batching, "collate", lambda *a, **k: made.append(1) or real(*a, **k))
    batches = stack.user.sampler.round_batches(3, 1, "user-0", 5000, 8)
    next(iter(batches))
    assert len(made) < 100, f"{len(made)} batches collated before the first step of a 5000-step round"


# -- our bugs: 500, a generic body, the traceback in the log ----------------------------------------------------

def _raising(exc: Exception) -> Any:
    def handler(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return handler


def _logged(caplog: pytest.LogCaptureFixture, exc_type: type) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "splitllm.http" and r.exc_info and r.exc_info[0] is exc_type]


@pytest.mark.parametrize("tier", ["cloud", "edge"])
def test_an_internal_bug_in_a_step_answers_500_while_client_errors_keep_their_4xx(stack, tier, monkeypatch, caplog):
    import cloud_server.compute
    import edge_server.compute

    module = {"cloud": cloud_server.compute, "edge": edge_server.compute}[tier]  # whose on_step runs serve_step
    rid = 600 + (tier == "edge")
    sessions = stack.open_sessions(rid, tiers=("cloud",) if tier == "cloud" else ("cloud", "edge"))
    msg = stack.step_message(rid, 0)
    for bug in (KeyError("boom"), ValueError("boom"), TypeError("boom"), RuntimeError("boom")):
        monkeypatch.setattr(module, "serve_step", _raising(bug))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="splitllm.http"):
            r = stack.post_msg(tier, "step", msg)
        assert r.status_code == 500, (type(bug).__name__, r.status_code, r.text)  # once KeyError 404, ValueError 422
        assert r.json() == {"detail": INTERNAL_ERROR} and "boom" not in r.text, r.text
        assert _logged(caplog, type(bug)), f"no traceback of the {type(bug).__name__} in the log: {caplog.text!r}"
        assert "boom" in caplog.text and "Traceback" in caplog.text
    # the project's own errors keep their status and reason
    for error, status in ((InvalidInput("x"), 422), (NotFound("no session x"), 404)):
        monkeypatch.setattr(module, "serve_step", _raising(error))
        r = stack.post_msg(tier, "step", msg)
        assert r.status_code == status and r.json() == {"detail": error.reason}, (status, r.status_code, r.text)
    monkeypatch.undo()
    assert stack.clients[tier].get("/healthz").status_code == 200
    r = stack.post_msg(tier, "step", msg)  # the real step: the failures left the session untouched
    assert r.status_code == 200, r.text
    assert all(s.steps == 1 for s in sessions.values())


def test_an_internal_bug_in_a_json_route_answers_500(stack, monkeypatch, caplog):
    client, headers = stack.clients["cloud"], bearer(stack.admin)
    monkeypatch.setattr(stack.cloud, "round_view", _raising(KeyError("boom")))
    with caplog.at_level(logging.ERROR, logger="splitllm.http"):
        r = client.get("/v1/rounds/1", headers=headers)
    assert r.status_code == 500 and r.json() == {"detail": INTERNAL_ERROR} and "boom" not in r.text, r.text
    assert _logged(caplog, KeyError) and "boom" in caplog.text
    monkeypatch.setattr(stack.cloud, "round_view", _raising(InvalidInput("x")))
    r = client.get("/v1/rounds/1", headers=headers)
    assert r.status_code == 422 and r.json() == {"detail": "x"}, r.text
    monkeypatch.undo()
    assert client.get("/healthz").status_code == 200
