"""Msgpack request bodies: read into one buffer under the size limit, within a tier's budget of bytes in flight.

A body is streamed into a ``MessageBuffer`` (one anonymous memory map, sized from ``content-length``
or, without one, the size limit; pages cost memory only once written) and decoded where it lies, so
its large tensors are views on the buffer and the body is never copied whole. The size limit holds
while reading, chunked or not; a declared length over it is refused before reading. Every body
counts against the tier's ``BodyBudget`` from before it is read until its reply is ready: a body
that would pass the budget is answered 503 with ``Retry-After`` before a byte of it is read.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from shared.errors import Busy
from shared.protocol.inplace import MessageBuffer
from shared.protocol.wire import CONTENT_TYPE, Message, WireError, decode


class BodyBudget:
    """The bytes of request bodies a tier holds at once; ``hold`` refuses with 503 (``Busy``) beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[Held]:
        """Count ``nbytes`` against the budget until the block ends (``Held.resize`` changes the count)."""
        with self._lock:
            if self.used + nbytes > self.limit:
                raise Busy(f"this tier holds {self.used} bytes of request bodies; {nbytes} more would pass its "
                           f"limit of {self.limit} (max_inflight_bytes): retry later")
            self.used += nbytes
        held = Held(self, nbytes)
        try:
            yield held
        finally:
            held.resize(0)

    def _adjust(self, delta: int) -> None:
        with self._lock:
            self.used += delta


class Held:
    """One body's share of a ``BodyBudget``."""

    def __init__(self, budget: BodyBudget, nbytes: int) -> None:
        self.budget, self.nbytes = budget, nbytes

    def resize(self, nbytes: int) -> None:
        """Count ``nbytes`` instead (smaller: a chunked body turned out shorter than the limit it held)."""
        self.budget._adjust(nbytes - self.nbytes)
        self.nbytes = nbytes


def budget_of(app: Any, limit: int) -> BodyBudget:
    """The app's body budget (made on first use, with ``limit`` bytes)."""
    budget = getattr(app.state, "body_budget", None)
    if budget is None:
        budget = app.state.body_budget = BodyBudget(limit)
    return budget


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


async def read_body(request: Request, max_bytes: int, declared: int | None) -> MessageBuffer:
    """The body in one buffer: 413 as soon as it passes ``max_bytes``, 400 if it disagrees with ``declared``."""
    buffer = MessageBuffer(max_bytes if declared is None else declared)
    try:
        async for chunk in request.stream():
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
    """The request's message and its size in bytes, counted against the tier's budget until the block ends.

    415, 413 and 503 come before the body is read; a bad body is a 4xx with the reason.
    """
    max_bytes = settings.max_message_bytes
    declared = declared_length(request, max_bytes)
    with budget_of(request.app, settings.inflight_limit()).hold(max_bytes if declared is None else declared) as held:
        buffer = await read_body(request, max_bytes, declared)
        size = len(buffer)
        held.resize(size)
        try:
            msg = await anyio.to_thread.run_sync(
                lambda body=buffer: decode(body, max_bytes=max_bytes, max_tensor_elements=settings.max_tensor_elements))
        except WireError as exc:
            raise HTTPException(400, f"bad message: {exc}") from None
        finally:
            del buffer  # what the tensors do not use is unmapped now
        yield msg, size
