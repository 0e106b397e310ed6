"""The client half of the HTTP transport: a link to a peer tier with retries, and JSON control calls."""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from shared.errors import UpstreamError
from shared.http.credentials import Credential
from shared.protocol.transport import ENDPOINTS, Link, LinkStats, round_key
from shared.protocol.wire import CONTENT_TYPE, Message, WireError, decode, encode
from shared.http.metrics import ByteLedger


class TransportError(UpstreamError):
    """A peer answered with an error, or could not be reached within the deadline (502 to our own caller).

    The reason shown to our caller does not name the peer's URL (an internal address); ``url`` keeps it for logs.
    """

    def __init__(self, message: str, status: int | None = None, url: str = "", detail: str = "") -> None:
        super().__init__(f"upstream: {message}", status)
        self.status, self.url, self.detail = status, url, detail


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail"))
    except (ValueError, AttributeError):
        return resp.text[:200]


def _reason(resp: httpx.Response) -> str:
    return f"HTTP {resp.status_code}: {_detail(resp)}"


def send_capped(client: httpx.Client, request: httpx.Request, max_bytes: int, url: str) -> httpx.Response:
    """``request``'s reply, its body read as it streams in and refused (``TransportError``) as soon as its declared or
    received (decompressed) size passes ``max_bytes``: a peer cannot make this tier hold more than its message limit.
    The reply returned holds the body and the ``Retry-After`` header, all ``with_retries`` and the caller read."""
    resp = client.send(request, stream=True)
    try:
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise TransportError(f"reply of {declared} bytes is over the limit of {max_bytes}", url=url)
        chunks, size = [], 0
        for chunk in resp.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise TransportError(f"reply is over the limit of {max_bytes} bytes", url=url)
    finally:
        resp.close()
    kept = {k: v for k, v in resp.headers.items() if k == "retry-after"}
    return httpx.Response(resp.status_code, headers=kept, content=b"".join(chunks), request=request)  # one copy


class SignedAuth:
    """Signs every request (each retry afresh) with this tier's credential, for ``audience``.

    A plain callable (httpx's function auth), so that any httpx-compatible client takes it.
    """

    def __init__(self, credential: Credential, audience: str) -> None:
        self.credential, self.audience = credential, audience

    def __call__(self, request: httpx.Request) -> httpx.Request:
        request.headers.update(self.credential.sign(request.method, request.url.raw_path.decode("latin-1"),
                                                    self.audience, request.content))
        return request


class BearerAuth:
    """A bearer secret: an admin credential, or the shared development token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: httpx.Request) -> httpx.Request:
        request.headers["authorization"] = f"Bearer {self.token}"
        return request


@dataclass(frozen=True)
class Identity:
    """How this tier authenticates its calls: its credential (signed requests), or a development token."""

    credential: Credential | None = None
    token: str | None = None
    verify: str | bool = True  # a CA bundle for peers' TLS certificates, or True for the system's

    def auth(self, audience: str) -> SignedAuth | BearerAuth | None:
        if self.credential is not None:
            return SignedAuth(self.credential, audience)
        return BearerAuth(self.token) if self.token else None


class HttpLink(Link):
    """POST /v1/<endpoint> with a msgpack body; the reply is msgpack too."""

    def __init__(self, base_url: str, upward: bool, *, timeout: float = 600.0, max_message_bytes: int = 256 << 20,
                 ledger: ByteLedger | None = None, retry_deadline: float = 30.0, emulator: Any = None,
                 identity: Identity = Identity(), audience: str = "") -> None:
        self.base_url, self.upward, self.emulator = base_url.rstrip("/"), upward, emulator
        self.auth = identity.auth(audience)
        self.client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0),
                                   auth=self.auth, verify=identity.verify)
        self.max_message_bytes = max_message_bytes
        self.ledger = ledger
        self.retry_deadline = retry_deadline
        self.stats = LinkStats()

    def request(self, endpoint: str, msg: Message) -> Message:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint '{endpoint}'")
        body, url = encode(msg), f"{self.base_url}/v1/{endpoint}"
        self.carry_request(len(body))
        request = self.client.build_request("POST", f"/v1/{endpoint}", content=body,
                                            headers={"content-type": CONTENT_TYPE})
        resp = with_retries(lambda: send_capped(self.client, request, self.max_message_bytes, url), self.retry_deadline)
        if resp.status_code >= 400:
            raise TransportError(f"{endpoint} {_reason(resp)}", resp.status_code, url)
        try:
            reply = decode(resp.content, max_bytes=self.max_message_bytes)
        except WireError as exc:
            raise TransportError(f"{endpoint} sent a malformed reply: {exc}", url=url) from None
        up, down = (len(body), len(resp.content)) if self.upward else (len(resp.content), len(body))
        self.stats.add(up, down, endpoint)
        if self.ledger is not None:
            self.ledger.add(round_key(msg), up, down)
        self.carry_reply(len(resp.content))
        return reply

    def close(self) -> None:
        self.client.close()


def with_retries(call: Callable[[], httpx.Response], deadline: float, base_delay: float = 0.2) -> httpx.Response:
    """Retry connection errors, 503s and 429s (after their ``Retry-After`` where given) with exponential backoff and
    jitter, until ``deadline`` seconds."""
    end = time.monotonic() + deadline
    delay = base_delay
    while True:
        try:
            resp = call()
            if resp.status_code not in (429, 503) or time.monotonic() >= end:
                return resp
            retry_after = resp.headers.get("retry-after")
            wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else delay
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ConnectTimeout, httpx.ReadError) as exc:
            if time.monotonic() >= end:
                raise TransportError(f"could not reach peer: {exc}") from exc
            wait = delay
        time.sleep(min(wait * (0.5 + random.random()), max(0.0, end - time.monotonic())))
        delay = min(delay * 2, 5.0)


def control_client(identity: Identity = Identity(), audience: str = "", timeout: float = 30.0) -> httpx.Client:
    """A client for JSON control calls to one peer, signed for ``audience``; keep it to call again (a heartbeat)."""
    return httpx.Client(timeout=timeout, auth=identity.auth(audience), verify=identity.verify)


def post_json(url: str, payload: dict[str, Any], deadline: float, identity: Identity = Identity(), audience: str = "",
              timeout: float = 30.0, client: httpx.Client | None = None) -> dict[str, Any]:
    """A JSON control call (registration), retried until the peer answers or the deadline passes; through
    ``client`` when given (``control_client(identity, audience)``, kept by the caller), else a client of its own."""
    with control_client(identity, audience, timeout) if client is None else nullcontext(client) as c:
        resp = with_retries(lambda: c.post(url, json=payload), deadline)
    if resp.status_code >= 400:
        raise TransportError(f"{httpx.URL(url).path}: {_reason(resp)}", resp.status_code, url, _detail(resp))
    return resp.json()


def get_json(url: str, deadline: float, identity: Identity = Identity(), audience: str = "",
             timeout: float = 30.0, client: httpx.Client | None = None) -> dict[str, Any]:
    with control_client(identity, audience, timeout) if client is None else nullcontext(client) as c:
        resp = with_retries(lambda: c.get(url), deadline)
    if resp.status_code >= 400:
        raise TransportError(f"{httpx.URL(url).path}: {_reason(resp)}", resp.status_code, url, _detail(resp))
    return resp.json()
