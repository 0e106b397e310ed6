"""Limits below the app, on connections: how long a request's head may take, and how many connections one peer holds.

uvicorn (0.54, h11) arms no timer while a request's head is arriving. Its keep-alive timer runs only after a
reply, and any byte cancels it. So a connection that opens and sends nothing, or sends its head a byte at a time,
is held for as long as its peer likes, one file descriptor each, before any credential is checked: enough of them
and the service accepts no honest connection. Here each connection must bring a request's whole head within
``header_timeout`` seconds of opening, or of the reply before; otherwise it is closed (with a 408 if part of a
head had come). The same deadline closes a connection whose request was answered before its body was read (a
413, 415 or 503 sent at once) and whose body has not all come since: uvicorn waits for the rest, only to discard
it, for as long as the peer likes (httpx reads the reply it was sent when its upload is cut). A body's own pace
is the app's to judge (``--min-body-rate``, ``shared.http.bodies``), and nothing here times a request once its head
is in. But a reply its peer does not read is held as long as it likes (the app waits to write the next, and a
closing connection waits for its bytes to be sent): a connection whose replies wait on its peer, and whose peer took
none of their bytes (Linux's count of bytes acknowledged; elsewhere, the write buffer's size) since a look
``header_timeout`` seconds before, is dropped. And one peer address (an IPv6 address: its /64, which one host
usually holds whole) may hold at most ``max_per_peer`` connections at once; one more gets a 503 and is closed, so a
single host cannot take every descriptor however fast it reconnects. The 503 is written as the connection opens,
before anything is read: if the peer's request is in already, the reset that closing an unread connection sends can
overtake it. The tiers' own clients retry a 503, a reset and a closed connection alike.

This is a subclass of uvicorn's own h11 protocol that adds timers and a count; parsing and everything else is
uvicorn's. It is passed to ``uvicorn.run(http=...)``, so every tier uses it whatever parsers are installed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import resource
import socket
import sys
import threading
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("splitllm.http")


def peer_key(client: tuple[str, int] | None) -> str:
    """Whom a connection counts against: its IPv4 address, or its IPv6 address's /64 (a host holds a whole /64)."""
    if client is None:
        return "?"
    host = client[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a unix socket's peer, say
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def raw_reply(status: int, reason: str, detail: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 reply that closes its connection, written before (or instead of) reading a request."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"] + ([f"retry-after: {retry_after}"] if retry_after is not None else [])
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class PeerCounts:
    """Open connections per peer key (the event loop's thread only, but cheap to lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no cap
        self.open: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, key: str) -> bool:
        with self._lock:
            n = self.open.get(key, 0)
            if self.limit and n >= self.limit:
                return False
            self.open[key] = n + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            n = self.open.get(key, 0) - 1
            if n > 0:
                self.open[key] = n
            else:
                self.open.pop(key, None)


class Throttled:
    """A warning logged at most once every ``every`` seconds, with how many were held back: an attack's thousands of
    refused connections make a few lines, not thousands."""

    def __init__(self, every: float = 10.0, logger: logging.Logger = log) -> None:
        self.every, self.last, self.held, self.log = every, -float("inf"), 0, logger

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.held += 1
            return
        held, self.last, self.held = self.held, now, 0
        self.log.warning(message + (f" ({held} more like it since the last such line)" if held else ""), *args,
                         stacklevel=2)


def guarded_protocol(header_timeout: float, max_per_peer: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's head and a cap on one peer's connections
    (``max_per_peer`` 0: no cap). One class per server: the counts are the server's."""
    if header_timeout <= 0:
        raise ValueError(f"header_timeout must be above 0 seconds (got {header_timeout})")
    counts = PeerCounts(max_per_peer)
    busy = raw_reply(503, "Service Unavailable", f"this address already holds {max_per_peer} open connections "
                     "(--max-connections-per-peer); close some and retry", retry_after=1)
    late = raw_reply(408, "Request Timeout", f"a request's head must arrive within {header_timeout:g} s "
                     "(--header-timeout)")
    refused, closed, dropped = Throttled(), Throttled(), Throttled()

    class GuardedH11Protocol(H11Protocol):
        counts_ = counts  # for tests and the curious: the server's open connections per peer

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._peer: str | None = None
            self._head_timer: asyncio.TimerHandle | None = None
            self._write_timer: asyncio.TimerHandle | None = None
            self._unread: tuple[int, int] | None = None  # if stuck at the last look: (bytes buffered, bytes acked)
            super().connection_made(transport)
            key = peer_key(self.client)
            if not counts.admit(key):
                refused.warn("refused a connection from %s: it holds %d already", key, max_per_peer)
                transport.write(busy)
                transport.close()
                return
            self._peer = key
            self._await_head()
            self._watch_writes()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_done()
            if self._write_timer is not None:
                self._write_timer.cancel()
            if self._peer is not None:
                counts.release(self._peer)
                self._peer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._peer is None:  # refused: whatever it sends is dropped with the connection
                return
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's head is in (uvicorn began its cycle): the app times the rest
                self._head_done()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            # the next request's head is awaited, unless a pipelined one began already (or the connection is closing)
            if not self.transport.is_closing() and self.cycle is cycle:
                self._await_head()

        def _await_head(self) -> None:
            self._head_done()
            self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def _head_done(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered: not this timer's business
            # No whole head in time; or the last request was answered before its body was read (a 413, a 503) and
            # the rest of that body, which uvicorn only discards, has not all come either: its peer reads the reply
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head waits, no more came
                closed.warn("closed a connection from %s: no whole request head in %g s", self._peer, header_timeout)
                self.transport.write(late)
            self.transport.close()

        def resume_writing(self) -> None:
            self._unread = None  # the peer read
            super().resume_writing()

        def _watch_writes(self) -> None:
            """Every ``header_timeout`` s: drop a connection whose replies wait on its peer (writing paused, or the
            connection closing with bytes still to send: asyncio waits for both for ever) if, since the last look,
            its peer acknowledged none of the bytes sent to it and none left the write buffer."""
            size = self.transport.get_write_buffer_size()
            stuck = size > 0 and (self.flow.write_paused or self.transport.is_closing())
            seen = (size, bytes_acked(self.transport)) if stuck else None
            if seen and self._unread and seen[0] >= self._unread[0] and seen[1] == self._unread[1]:
                dropped.warn("dropped a connection from %s: it read none of its replies in %g s", self._peer,
                             header_timeout)
                self.transport.abort()
                return
            self._unread = seen
            self._write_timer = self.loop.call_later(header_timeout, self._watch_writes)

    return GuardedH11Protocol


def bytes_acked(transport: asyncio.BaseTransport) -> int:
    """How many bytes the peer has acknowledged on this connection (Linux's ``tcpi_bytes_acked``), TLS or not; 0 where
    the system does not say."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)
    except (AttributeError, OSError):  # not Linux, or not TCP
        return 0
    return int.from_bytes(info[120:128], sys.byteorder) if len(info) >= 128 else 0


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (each connection holds one); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may forbid it: the soft limit stays
            pass
    return soft
