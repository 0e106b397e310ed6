"""A user's heartbeat over the apps' real HTTP code path: what it last heard from its edge shows in its
``GET /v1/status`` (``edge``) and in one log line per change: the edge answering, not answering, and refusing
the user's credential once it has been revoked at the cloud."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from stack_helpers import Stack, bearer, inprocess_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("heartbeat")) as s:
        yield s


def edge_contact(stack: Stack) -> dict:
    r = stack.clients["user"].get("/v1/status", headers=bearer(stack.admin))
    assert r.status_code == 200, r.text
    return r.json()["edge"]


def beat(stack: Stack) -> None:
    service = stack.services["user"]
    service._beat(service.agent, None)  # one heartbeat, as the thread runs it every --heartbeat seconds


def test_the_status_tells_an_answering_a_silent_and_a_refusing_edge_apart(stack: Stack, caplog) -> None:
    caplog.set_level(logging.INFO, logger="splitllm.user")
    assert edge_contact(stack)["state"] == "ok"  # it registered at start
    beat(stack)
    assert edge_contact(stack)["state"] == "ok"

    edge = stack.clients.pop("edge")  # the edge stops answering
    try:
        beat(stack)
        beat(stack)
    finally:
        stack.clients["edge"] = edge
    silent = edge_contact(stack)
    assert silent["state"] == "unreachable" and silent["status"] is None and "connection refused" in silent["reason"]
    assert len([r for r in caplog.records if "does not answer" in r.message]) == 1  # once per change, not per beat

    beat(stack)
    assert edge_contact(stack)["state"] == "ok"
    assert any("answers user user-0 again" in r.message for r in caplog.records)

    r = stack.clients["cloud"].post("/v1/credentials/revoke", json={"subject": "user:user-0"}, headers=bearer(stack.admin))
    assert r.status_code == 200, r.text
    stack.services["edge"].revocations.merge(stack.cloud.revocations.to_meta())  # as the next round's start tells it
    beat(stack)
    beat(stack)
    refused = edge_contact(stack)
    assert refused["state"] == "refused" and refused["status"] == 401, refused
    assert "the credential of user:user-0 has been revoked" in refused["reason"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "refuses the credential" in r.message]
    assert len(errors) == 1 and "new credential" in errors[0].message


def test_the_heartbeat_stops_when_the_app_shuts_down(tmp_path) -> None:
    import threading

    before = set(threading.enumerate())
    with inprocess_stack(tmp_path) as s:
        assert s.services["user"].started
        beating = [t for t in threading.enumerate() if t.name == "user-heartbeat" and t not in before]
        assert len(beating) == 1 and beating[0].is_alive()
    beating[0].join(timeout=10)  # it waits --heartbeat (15 s) between beats: only the shutdown's event ends it sooner
    assert not beating[0].is_alive()
