"""The issue's attacks on sessions and on credentials that should no longer work, replayed against the
in-process deployment (stack_helpers.py: real apps, their real HTTP code path): a step or update for another
user's live session, a replayed or out-of-order step, and a revoked credential (refused at once by the cloud,
by the edge from its next round's start).

Identity takeover, callback URLs and stolen requests: test_attacks_identity.py.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pytest
import torch

from shared.http.credentials import Credential
from shared.protocol.enums import Mode
from shared.protocol.messages import Update
from shared.protocol.wire import CONTENT_TYPE, encode
from stack_helpers import Stack, bearer, inprocess_stack, run_round


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("attacks-sessions")) as s:
        yield s


def progress(sessions: dict[str, Any]) -> dict[str, tuple[int, int, list[torch.Tensor]]]:
    """Each tier session's step count, last step and adapters (copies)."""
    return {t: (s.steps, s.last_step, [p.detach().clone() for p in s.params.values()]) for t, s in sessions.items()}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[t][:2] == b[t][:2] and all(torch.equal(x, y) for x, y in zip(a[t][2], b[t][2], strict=True))
               for t in a)


# -- session hijack ---------------------------------------------------------------------------------------------------

def test_session_hijack_another_users_steps_and_updates_are_refused(stack):
    """user-1 steps user-0's live session (the issue's ``step: 100000`` included) or reports its update: 403,
    the session untouched; the victim's next step still works."""
    rid = 700
    sessions = stack.open_sessions(rid)
    before = progress(sessions)
    for step in (0, 100000):
        r = stack.post_msg("edge", "step", stack.step_message(rid, step), as_="user-1")
        assert r.status_code == 403 and "may not act for user 'user-0'" in r.json()["detail"], r.text
    update = Update(round=rid, user="user-0", mode=Mode.TRAIN, num_samples=10**9, metrics={"train_loss": 0.0},
                    adapters={k.split("/", 1)[1]: v + 3.0 for k, v in stack.adapter_tensors("user").items()})
    r = stack.post_msg("edge", "update", update.to_message(), as_="user-1")
    assert r.status_code == 403 and "may not act for user 'user-0'" in r.json()["detail"], r.text
    # at the cloud, an edge steps only its own users' sessions
    body = encode(stack.step_message(rid, 0))
    headers = {**stack.issue("edge", "edge-9").sign("POST", "/v1/step", "cloud", body), "content-type": CONTENT_TYPE}
    r = stack.clients["cloud"].post("/v1/step", content=body, headers=headers)
    assert r.status_code == 403 and "may not step user 'user-0'" in r.json()["detail"], r.text
    assert same(before, progress(sessions)), "a refused step moved the victim's session"
    r = stack.post_msg("edge", "step", stack.step_message(rid, 0))
    assert r.status_code == 200, r.text
    assert all(s.steps == 1 and s.last_step == 0 for s in sessions.values())


def test_session_hijack_replays_and_steps_out_of_order_are_refused(stack):
    """A served step's exact request (bytes and headers) again: 401 (replayed nonce); another user's retry of it:
    403 (the cached reply goes to the owner only); the owner's own retry: the cached reply. A step that is not the
    next one is refused even from the owner (422), and leaves the session as it was."""
    rid = 710
    sessions = stack.open_sessions(rid)
    body = encode(stack.step_message(rid, 0))
    headers = {**stack.signed("user-0", "POST", "/v1/step", body, tier="edge"), "content-type": CONTENT_TYPE}
    first = stack.clients["edge"].post("/v1/step", content=body, headers=headers)
    assert first.status_code == 200, first.text
    served = progress(sessions)
    again = stack.clients["edge"].post("/v1/step", content=body, headers=headers)
    assert again.status_code == 401 and "replayed" in again.json()["detail"], again.text
    stolen = stack.post_msg("edge", "step", body, as_="user-1")
    assert stolen.status_code == 403 and stolen.content != first.content, stolen.text
    retry = stack.post_msg("edge", "step", body)
    assert retry.status_code == 200 and retry.content == first.content, retry.text
    for step, reason in ((100000, "skips ahead: the next step is 1"), (2, "skips ahead"), (-1, ">= 0")):
        r = stack.post_msg("edge", "step", stack.step_message(rid, step))
        assert r.status_code == 422 and reason in r.json()["detail"], (step, r.text)
    assert same(served, progress(sessions)), "a replayed or out-of-order step moved the session"
    r = stack.post_msg("edge", "step", stack.step_message(rid, 1, seed=1))
    assert r.status_code == 200, r.text
    assert all(s.steps == 2 and s.last_step == 1 for s in sessions.values())


# -- revocation --------------------------------------------------------------------------------------------------------

def spec_at(stack: Stack, tier: str, credential: Credential) -> Any:
    audience = {"cloud": "cloud", "edge": "edge:edge-0"}[tier]
    return stack.clients[tier].get("/v1/spec", headers=credential.sign("GET", "/v1/spec", audience))


def revoke(stack: Stack, **what: str) -> dict[str, Any]:
    r = stack.clients["cloud"].post("/v1/credentials/revoke", json=what, headers=bearer(stack.admin))
    assert r.status_code == 200, r.text
    return r.json()


def test_revocation_the_cloud_refuses_at_once_and_the_edge_from_its_next_round(stack):
    edge9, user1 = stack.issue("edge", "edge-9"), stack.credential("user-1")
    assert spec_at(stack, "cloud", edge9).status_code == 200 and spec_at(stack, "edge", user1).status_code == 200
    assert spec_at(stack, "cloud", user1).status_code == 403  # a user's credential: not the cloud's caller
    listed = revoke(stack, jti=edge9.principal().jti)
    assert edge9.principal().jti in listed["jtis"]
    listed = revoke(stack, subject="user:user-1")
    assert "user:user-1" in listed["subjects"]
    for credential in (edge9, user1):  # the cloud: at once
        r = spec_at(stack, "cloud", credential)
        assert r.status_code == 401 and "revoked" in r.json()["detail"], r.text
    # the edge has not heard of it yet; the next round's start tells it
    assert "user:user-1" not in stack.services["edge"].revocations.to_meta()["subjects"]
    view = run_round(stack)
    assert view["state"] == "committed" and view["metrics"]["dropped"] == [], view  # the others keep training
    body = json.dumps({"user_id": "user-1", "url": "http://user.test", "num_samples": 1}).encode()
    register = stack.clients["edge"].post("/v1/users", content=body, headers={
        "content-type": "application/json", **user1.sign("POST", "/v1/users", "edge:edge-0", body)})
    for r in (spec_at(stack, "edge", user1), register):
        assert r.status_code == 401 and "revoked" in r.json()["detail"], r.text
    assert spec_at(stack, "edge", stack.credential("user-0")).status_code == 200
    assert spec_at(stack, "cloud", stack.credential("edge-0")).status_code == 200
    r = stack.clients["cloud"].get("/v1/credentials/revoked", headers=bearer(stack.admin))
    assert "user:user-1" in r.json()["subjects"] and edge9.principal().jti in r.json()["jtis"], r.text


def test_revocation_a_credential_issued_right_after_its_subjects_revocation_is_accepted(stack):
    """``--subject`` revokes the credentials issued before now: the one an admin issues next must work, even
    within the same second (credentials carry whole-second issue times)."""
    old = stack.issue("edge", "edge-8")
    assert spec_at(stack, "cloud", old).status_code == 200
    while time.time() % 1 > 0.5:  # revoke and re-issue within one second, as an admin's script would
        time.sleep(0.05)
    revoke(stack, subject="edge:edge-8")
    new = stack.issue("edge", "edge-8")
    assert spec_at(stack, "cloud", old).status_code == 401
    r = spec_at(stack, "cloud", new)
    assert r.status_code == 200, (r.status_code, r.text, new.principal().issued_at)
