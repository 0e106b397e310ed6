"""Msgpack request bodies: read into one buffer under the size limit, within a tier's budget of bytes in flight.

A body is streamed into a ``MessageBuffer`` (one anonymous memory map, sized from ``content-length``
or, without one, the size limit; pages cost memory only once written) and decoded where it lies, so
its large tensors are views on the buffer and the body is never copied whole. The size limit holds
while reading, chunked or not; a declared length over it is refused before reading. Every body
counts against the tier's ``BodyBudget`` from before it is read until its reply is ready (once its tensors'
declared sizes are known, as the larger of its size and theirs: compressed tensors take their decoded size): a body
that would pass the budget is answered 503 with ``Retry-After`` before a byte of it is read. One caller
(one credential; the peer's address without credentials) holds at most its share of the budget, so a
caller that trickles its bodies cannot take the whole of it from the others; and a body must keep
arriving at ``min_body_rate`` once ``body_grace`` seconds have passed, or it gets 408 and its share back.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from shared.errors import Busy
from shared.http.auth import principal_of
from shared.protocol.inplace import MessageBuffer
from shared.protocol.wire import CONTENT_TYPE, Message, WireError, decode


class BodyBudget:
    """The bytes of request bodies a tier holds at once; ``hold`` refuses with 503 (``Busy``) beyond ``limit``,
    or beyond ``caller_limit`` for one caller."""

    def __init__(self, limit: int, caller_limit: int | None = None) -> None:
        self.limit, self.used = limit, 0
        self.caller_limit = limit if caller_limit is None else caller_limit
        self.by_caller: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, nbytes: int, caller: str = "") -> Iterator[Held]:
        """Count ``nbytes`` against the budget, and ``caller``'s share of it, until the block ends
        (``Held.resize`` changes the count)."""
        with self._lock:
            self._take(caller, nbytes)
        held = Held(self, nbytes, caller)
        try:
            yield held
        finally:
            held.resize(0)

    def take_more(self, caller: str, nbytes: int) -> None:
        """Count ``nbytes`` more for a body already held (``Held.grow_to``), or ``Busy`` as ``hold`` would."""
        with self._lock:
            self._take(caller, nbytes)

    def _take(self, caller: str, nbytes: int) -> None:
        """Count ``nbytes`` more (call with the lock held), or ``Busy`` beyond the budget or the caller's share."""
        mine = self.by_caller.get(caller, 0)
        if mine + nbytes > self.caller_limit:
            raise Busy(f"this caller has {mine} bytes of request bodies in flight; {nbytes} more would pass "
                       f"its share of {self.caller_limit} of the tier's max_inflight_bytes: retry later")
        if self.used + nbytes > self.limit:
            raise Busy(f"this tier holds {self.used} bytes of request bodies; {nbytes} more would pass its "
                       f"limit of {self.limit} (max_inflight_bytes): retry later")
        self.used += nbytes
        self.by_caller[caller] = mine + nbytes

    def _adjust(self, caller: str, delta: int) -> None:
        with self._lock:
            self.used += delta
            left = self.by_caller.get(caller, 0) + delta
            if left:
                self.by_caller[caller] = left
            else:
                self.by_caller.pop(caller, None)


class Held:
    """One body's share of a ``BodyBudget``."""

    def __init__(self, budget: BodyBudget, nbytes: int, caller: str = "") -> None:
        self.budget, self.nbytes, self.caller = budget, nbytes, caller

    def resize(self, nbytes: int) -> None:
        """Count ``nbytes`` instead (smaller: a chunked body turned out shorter than the limit it held)."""
        self.budget._adjust(self.caller, nbytes - self.nbytes)
        self.nbytes = nbytes

    def grow_to(self, nbytes: int) -> None:
        """Count at least ``nbytes`` (a body about to be decoded into more than it holds), or ``Busy`` where that
        would pass the budget or the caller's share."""
        if nbytes > self.nbytes:
            self.budget.take_more(self.caller, nbytes - self.nbytes)
            self.nbytes = nbytes


def budget_of(app: Any, settings: Any) -> BodyBudget:
    """The app's body budget (made on first use, from the tier's settings)."""
    budget = getattr(app.state, "body_budget", None)
    if budget is None:
        budget = app.state.body_budget = BodyBudget(settings.inflight_limit(), settings.caller_inflight_limit())
    return budget


def caller_of(request: Request) -> str:
    """Whose share of the budget a body counts against: the credential's role and id, else the peer's address."""
    principal = principal_of(request)
    if principal is not None:
        return f"{principal.role}:{principal.id}"
    return f"peer:{request.client.host if request.client else ''}"


def declared_length(request: Request, max_bytes: int) -> int | None:
    """The body's declared length (None when it is chunked); 415 unless msgpack, 413 over ``max_bytes``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != CONTENT_TYPE:
        raise HTTPException(415, f"content type must be {CONTENT_TYPE} (got '{ctype or 'none'}')")
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    if int(declared) > max_bytes:
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {max_bytes}")
    return int(declared)


async def read_body(request: Request, max_bytes: int, declared: int | None, min_rate: float = 0.0,
                    grace: float = math.inf) -> MessageBuffer:
    """The body in one buffer: 413 as soon as it passes ``max_bytes``, 400 if it disagrees with ``declared``,
    408 once ``grace`` seconds have passed and fewer than ``min_rate`` bytes per second have arrived."""
    buffer = MessageBuffer(max_bytes if declared is None else declared)
    start, chunks = time.monotonic(), request.stream().__aiter__()
    try:
        while True:
            # the next chunk is due when the bytes read so far stop covering min_rate past the grace
            due = start + grace + (len(buffer) / min_rate if min_rate > 0 else math.inf)
            with anyio.move_on_after(max(0.0, due - time.monotonic())) as waited:
                chunk = await anext(chunks, None)
            if waited.cancelled_caught:
                raise HTTPException(408, f"body arrived too slowly: {len(buffer)} bytes in "
                                         f"{time.monotonic() - start:.0f} s, under min_body_rate of {min_rate:.0f} "
                                         f"bytes/s after body_grace of {grace:g} s")
            if chunk is None:
                break
            size = len(buffer) + len(chunk)
            if size > max_bytes:
                raise HTTPException(413, f"body is over the limit of {max_bytes} bytes")
            if declared is not None and size > declared:
                raise HTTPException(400, f"body is longer than its content-length of {declared} bytes")
            buffer.write(chunk)
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before its body ended") from None
    if declared is not None and len(buffer) != declared:
        raise HTTPException(400, f"body ended after {len(buffer)} of its {declared} bytes")
    return buffer


@asynccontextmanager
async def incoming_message(request: Request, settings: Any) -> AsyncIterator[tuple[Message, int]]:
    """The request's message and its size in bytes, counted against the tier's budget (and the caller's share of
    it) until the block ends.

    415, 413 and 503 come before the body is read; a bad or too slow body is a 4xx with the reason.
    """
    max_bytes = settings.max_message_bytes
    declared = declared_length(request, max_bytes)
    budget = budget_of(request.app, settings)
    with budget.hold(max_bytes if declared is None else declared, caller_of(request)) as held:
        buffer = await read_body(request, max_bytes, declared, settings.min_body_rate, settings.body_grace)
        size = len(buffer)
        held.resize(size)
        try:
            # a compressed or lossy tensor takes its decoded size: the body counts as the larger of the two, 503 before
            # any tensor is decoded where that passes the budget (a small lz4 body may decode to max_bytes)
            msg = await anyio.to_thread.run_sync(
                lambda body=buffer: decode(body, max_bytes=max_bytes, max_tensor_elements=settings.max_tensor_elements,
                                           reserve=lambda decoded: held.grow_to(max(size, decoded))))
        except WireError as exc:
            raise HTTPException(400, f"bad message: {exc}") from None
        finally:
            del buffer  # what the tensors do not use is unmapped now
        yield msg, size
