"""What a handler does after its reply (an edge's report to the cloud, once a user's update settled the round) cannot
change that reply: over HTTP it runs once the reply has gone, in-process after it is made; a failure is logged."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.config.settings import ServiceSettings
from shared.errors import InvalidInput
from shared.http.auth import Auth, rule
from shared.http.server import guard, msgpack_route, serve_message
from shared.protocol.messages import ack
from shared.protocol.transport import InProcessLink
from shared.protocol.wire import CONTENT_TYPE, Message, decode, encode


class Settles:
    """Acks an update, then reports onwards, and the report is refused."""

    def __init__(self) -> None:
        self.after: list[str] = []

    def on_update(self, msg: Message) -> Message:
        return ack(round=1)

    def after_update(self, msg: Message) -> None:
        self.after.append(msg.kind)
        raise InvalidInput("edge edge-0 reports users it was not started with")


def test_over_http_the_caller_gets_its_reply_when_what_follows_fails(caplog: Any) -> None:
    handler, settings, app = Settles(), ServiceSettings(insecure_dev=True), FastAPI()
    guard(app, Auth(None, (), [rule("*", "/v1/.*")], insecure=True))

    async def route(request: Any, endpoint: str) -> Any:
        return await serve_message(request, handler.on_update, settings, after=handler.after_update)

    msgpack_route(app, "update", route)
    with caplog.at_level(logging.ERROR), TestClient(app) as client:
        r = client.post("/v1/update", content=encode(Message("update", {"round": 1})),
                        headers={"content-type": CONTENT_TYPE})
    assert r.status_code == 200 and decode(r.content).kind == "ok"
    assert handler.after == ["update"] and "not started with" in caplog.text


def test_in_process_the_same(caplog: Any) -> None:
    handler = Settles()
    with caplog.at_level(logging.ERROR):
        reply = InProcessLink(handler, upward=True).request("update", Message("update", {"round": 1}))
    assert reply.kind == "ok" and handler.after == ["update"] and "not started with" in caplog.text
