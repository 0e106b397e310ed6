"""A peer's reply is read within the link's message limit: a user answering its edge's start with an endless body
(its callback URL is its own) costs the edge at most ``max_message_bytes``, not its memory."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from shared.http.client import HttpLink, TransportError
from shared.protocol.messages import ack

LIMIT = 1 << 20


def hostile_peer(declare_length: bool) -> tuple[str, dict[str, int], threading.Thread]:
    """A server that answers one request 200 with a 256 MiB body (chunked, or with its content-length), counting
    what it got out before the client hung up."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent = {"bytes": 0}

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                              if line.startswith(b"content-length")))
            while len(body) < length:  # read it all: a socket closed with unread bytes resets the connection
                body += conn.recv(65536)
            size, chunk = 256 << 20, b"\0" * (1 << 16)
            framing = f"content-length: {size}" if declare_length else "transfer-encoding: chunked"
            try:
                conn.sendall(f"HTTP/1.1 200 OK\r\ncontent-type: application/x-msgpack\r\n{framing}\r\n\r\n".encode())
                for _ in range(size // len(chunk)):
                    conn.sendall(chunk if declare_length else b"10000\r\n" + chunk + b"\r\n")
                    sent["bytes"] += len(chunk)
                conn.sendall(b"" if declare_length else b"0\r\n\r\n")
            except OSError:  # the client hung up
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", sent, thread


@pytest.fixture(params=[False, True], ids=["chunked", "content-length"])
def peer(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, int], threading.Thread]]:
    yield hostile_peer(request.param)


def test_a_reply_over_the_message_limit_is_refused_as_it_arrives(peer):
    url, sent, thread = peer
    link = HttpLink(url, upward=False, max_message_bytes=LIMIT, retry_deadline=0)
    with pytest.raises(TransportError, match="over the limit"):
        link.request("start", ack())
    link.close()
    thread.join(10)
    assert sent["bytes"] < 64 * LIMIT, sent  # what the socket buffers held, not the 256 MiB
