"""Reading msgpack bodies (shared.http.bodies): the size limit while reading, chunked or not, a declared length over
it refused before reading, bodies that disagree with their declared length, and the budget of bytes in flight
(503 with Retry-After before a byte is read). A real FastAPI app, driven through ASGI so that each test controls
the chunks and sees how many were read."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import torch
from fastapi import FastAPI
from pydantic import ValidationError

from shared.config.settings import ServiceSettings
from shared.errors import NotFound
from shared.http.auth import Auth, rule
from shared.http.bodies import budget_of
from shared.http.server import guard, msgpack_route, serve_message
from shared.protocol.messages import ack
from shared.protocol.wire import CONTENT_TYPE, Message, encode

LIMIT = 1000


@dataclass
class Tier:
    """An app with one msgpack route, ``/v1/step``, whose handler records messages and may be made to wait."""

    app: FastAPI
    settings: ServiceSettings
    seen: list[Message] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    fail: bool = False

    @property
    def used(self) -> int:
        return budget_of(self.app, self.settings).used


def tier(inflight: int | None = None, **more: Any) -> Tier:
    settings = ServiceSettings(max_message_bytes=LIMIT, max_inflight_bytes=inflight, insecure_dev=True, **more)
    app = FastAPI()
    guard(app, Auth(None, (), [rule("*", "/v1/.*")], insecure=True))
    t = Tier(app, settings)
    t.gate.set()

    def handler(msg: Message) -> Message:
        t.gate.wait(10)
        if t.fail:
            raise NotFound("no such session")
        t.seen.append(msg)
        return ack()

    async def run(request: Any, endpoint: str) -> Any:
        return await serve_message(request, handler, settings)

    msgpack_route(app, "step", run)
    return t


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks_read: int


async def post(t: Tier, chunks: list[bytes], length: int | None = -1, content_type: str = CONTENT_TYPE,
               hold: anyio.Event | None = None, disconnect_after: int | None = None, peer: str = "127.0.0.1",
               pause: float = 0.0) -> Reply:
    """POST the chunks through ASGI; ``length``: the content-length header (-1: the true one, None: chunked);
    ``hold``: wait for it before sending the last chunk; ``peer``: the caller's address (the budget's caller
    without credentials); ``pause``: seconds before each chunk after the first."""
    headers = [(b"content-type", content_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(sum(map(len, chunks)) if length == -1 else length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/step", "raw_path": b"/v1/step", "query_string": b"", "root_path": "", "headers": headers,
             "client": (peer, 1), "server": ("127.0.0.1", 80)}
    read, out = 0, {"headers": {}, "body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read == disconnect_after or read >= len(chunks):
            return {"type": "http.disconnect"}
        if hold is not None and read == len(chunks) - 1:
            await hold.wait()
        if pause and read:
            await anyio.sleep(pause)
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await t.app(scope, receive, send)
    return Reply(out["status"], out["headers"], out["body"], read)


def run(coro_fn: Any, *args: Any, **kw: Any) -> Any:
    return anyio.run(lambda: coro_fn(*args, **kw))


def message(n: int = 50) -> Message:
    return Message("step", meta={"n": n}, tensors={"x": torch.arange(float(n))})


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    t = tier()
    r = run(post, t, [b"x" * (LIMIT + 1)])
    assert r.status == 413 and r.chunks_read == 0, r
    assert t.used == 0


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    t = tier()
    r = run(post, t, [b"x" * 100] * 50, length=None)
    assert r.status == 413, r
    assert r.chunks_read == LIMIT // 100 + 1  # the chunk that passed the limit was the last one read
    assert t.used == 0 and t.seen == []


@pytest.mark.parametrize("length", [None, -1], ids=["chunked", "declared"])
def test_a_body_in_many_chunks_is_read_whole_and_decoded(length: int | None) -> None:
    t = tier()
    data = encode(message(), codec="raw")
    r = run(post, t, pieces(data, 7), length=length)
    assert r.status == 200, r.body
    assert t.seen[0].meta == {"n": 50} and torch.equal(t.seen[0].tensors["x"], torch.arange(50.0))
    assert t.used == 0


def test_a_body_that_disagrees_with_its_content_length_is_refused() -> None:
    t = tier()
    data = encode(message(), codec="raw")
    shorter = run(post, t, pieces(data, 100), length=len(data) + 10)
    assert shorter.status == 400 and "ended after" in shorter.body.decode(), shorter
    longer = run(post, t, pieces(data, 100), length=len(data) - 10)
    assert longer.status == 400 and "longer than its content-length" in longer.body.decode(), longer
    gone = run(post, t, pieces(data, 100), disconnect_after=1)
    assert gone.status == 400 and "went away" in gone.body.decode(), gone
    assert t.used == 0 and t.seen == []


def test_the_content_type_is_checked_before_reading() -> None:
    t = tier()
    r = run(post, t, [b"{}"], content_type="application/json")
    assert r.status == 415 and r.chunks_read == 0


def test_past_the_budget_a_body_gets_503_with_retry_after_before_it_is_read() -> None:
    t = tier(inflight=LIMIT)
    first, second = pieces(encode(message(220), codec="raw"), 64), encode(message(10), codec="raw")
    assert sum(map(len, first)) + len(second) > LIMIT  # while the first is in flight, there is no room for the second

    async def scenario() -> tuple[Reply, Reply, Reply, Reply]:
        hold = anyio.Event()
        replies: dict[str, Reply] = {}
        async with anyio.create_task_group() as tg:
            async def in_flight() -> None:
                replies["first"] = await post(t, first, hold=hold)

            tg.start_soon(in_flight)
            while t.used == 0:  # the first body holds its declared length while it is read
                await anyio.sleep(0.001)
            replies["declared"] = await post(t, [second])
            replies["chunked"] = await post(t, [second], length=None)  # holds the limit: refused too
            hold.set()
        replies["later"] = await post(t, [second])
        return replies["first"], replies["declared"], replies["chunked"], replies["later"]

    first_r, declared, chunked, later = anyio.run(scenario)
    for r in (declared, chunked):
        assert r.status == 503 and r.chunks_read == 0, r
        assert float(r.headers["retry-after"]) > 0 and "max_inflight_bytes" in r.body.decode()
    assert first_r.status == 200 and later.status == 200
    assert t.used == 0


def test_a_chunked_body_holds_only_its_size_once_read_and_everything_is_given_back() -> None:
    t = tier(inflight=2 * LIMIT)
    data = encode(message(), codec="raw")
    t.gate.clear()
    seen_used: list[int] = []

    async def scenario() -> Reply:
        async with anyio.create_task_group() as tg:
            result: dict[str, Reply] = {}

            async def go() -> None:
                result["r"] = await post(t, pieces(data, 50), length=None)

            tg.start_soon(go)
            while not t.used or t.used == LIMIT:  # reading: the limit is held; handling: the body's size
                await anyio.sleep(0.001)
            seen_used.append(t.used)
            t.gate.set()
        return result["r"]

    assert anyio.run(scenario).status == 200
    assert seen_used == [len(data)] and t.used == 0
    t.fail = True  # a handler's error gives the body's share back too
    assert run(post, t, [data]).status == 404 and t.used == 0


def test_the_budget_defaults_to_four_bodies_and_holds_at_least_one() -> None:
    assert ServiceSettings(max_message_bytes=LIMIT).inflight_limit() == 4 * LIMIT
    assert ServiceSettings(max_message_bytes=LIMIT, max_inflight_bytes=LIMIT).inflight_limit() == LIMIT
    with pytest.raises(ValidationError, match="at least max_message_bytes"):
        ServiceSettings(max_message_bytes=LIMIT, max_inflight_bytes=LIMIT - 1)


def test_one_caller_holds_at_most_half_the_budget_and_others_still_get_in() -> None:
    t = tier(inflight=4 * LIMIT)
    assert t.settings.caller_inflight_limit() == 2 * LIMIT
    body = encode(message(200), codec="raw")
    assert 2 * len(body) <= 2 * LIMIT < 3 * len(body)

    async def scenario() -> dict[str, Reply]:
        hold, replies = anyio.Event(), {}
        async with anyio.create_task_group() as tg:
            for i in range(2):  # the trickler: two bodies that stop before their last chunk
                async def slow(i: int = i) -> None:
                    replies[f"slow{i}"] = await post(t, pieces(body, 100), hold=hold, peer="10.0.0.66")
                tg.start_soon(slow)
            while t.used < 2 * len(body):
                await anyio.sleep(0.001)
            replies["third"] = await post(t, [body], peer="10.0.0.66")  # past its share: refused
            replies["other"] = await post(t, [body], peer="10.0.0.7")  # another caller finds room
            hold.set()
        return replies

    replies = anyio.run(scenario)
    third = replies["third"]
    assert third.status == 503 and third.chunks_read == 0 and "its share" in third.body.decode(), third
    assert float(third.headers["retry-after"]) > 0
    assert replies["other"].status == 200 and replies["slow0"].status == replies["slow1"].status == 200
    assert t.used == 0 and budget_of(t.app, t.settings).by_caller == {}


def test_a_body_slower_than_the_minimum_rate_gets_408_and_its_share_back() -> None:
    t = tier(min_body_rate=1000, body_grace=0.05)
    data = encode(message(), codec="raw")
    slow = run(post, t, pieces(data, 10), pause=0.03)  # ~330 bytes/s: under the rate once the grace has passed
    assert slow.status == 408 and "too slowly" in slow.body.decode() and "min_body_rate" in slow.body.decode(), slow
    assert slow.chunks_read < len(pieces(data, 10))
    assert t.used == 0 and t.seen == []
    fast = run(post, t, pieces(data, 10), pause=0.001)  # ~10 kB/s: well over the rate
    assert fast.status == 200, fast


def test_a_compressed_body_counts_as_its_decoded_size_before_any_tensor_is_decoded() -> None:
    """A small lz4 body may decode to max_message_bytes. It used to count as its compressed bytes only, so one
    caller's many small bodies were decoded at once far past its share (60 lz4 bodies of 130 KB, 8 MB of budget,
    took an edge with 32 MB bodies from 0.4 to 2.3 GB resident)."""
    t = tier(inflight=2 * LIMIT)  # the caller's share: LIMIT
    body = encode(Message("step", tensors={"x": torch.zeros(150)}), codec="lz4")  # 600 bytes decoded
    assert len(body) < 100 and 600 + len(body) <= LIMIT < 2 * 600
    t.gate.clear()

    async def scenario() -> tuple[Reply, Reply, int]:
        replies: dict[str, Reply] = {}
        async with anyio.create_task_group() as tg:
            async def first() -> None:
                replies["first"] = await post(t, [body])

            tg.start_soon(first)
            with anyio.move_on_after(5):
                while not t.used or t.used == len(body):  # handled: it holds its decoded size, not its compressed one
                    await anyio.sleep(0.001)
            held = t.used
            replies["second"] = await post(t, [body])  # its body fits the share; its decoded size does not
            t.gate.set()
        return replies["first"], replies["second"], held

    first, second, held = anyio.run(scenario)
    assert held == 600 and first.status == 200
    assert second.status == 503 and float(second.headers["retry-after"]) > 0 and "its share" in second.body.decode()
    assert len(t.seen) == 1 and t.used == 0
    assert run(post, t, [body]).status == 200 and t.used == 0  # alone, it is served
