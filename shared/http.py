"""The HTTP side of the transport seam: an httpx client link, and the server half every tier's app uses."""

from __future__ import annotations

import hmac
import logging
import random
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import anyio
import httpx
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.tier import Busy, SessionError
from shared.transport import ENDPOINTS, Link, LinkStats
from shared.wire import CONTENT_TYPE, Message, WireError, decode, encode

log = logging.getLogger("splitllm.http")

# What each endpoint's message must carry, checked before any compute runs.
REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "step": (("round", "user", "step", "mode"), ("hidden", "attention_mask", "labels")),
    "update": (("round", "mode", "num_samples", "metrics"), ()),
    "start": ((), ()),
}


class TransportError(RuntimeError):
    """A peer answered with an error, or could not be reached within the deadline."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def round_key(msg: Message) -> tuple[int, str] | None:
    """The (round, mode) a message belongs to, for per-round byte accounting."""
    meta = msg.meta
    if "round" in meta and "mode" in meta:
        return int(meta["round"]), str(meta["mode"])
    plan = meta.get("plan") or (meta.get("plans") or [None])[0]
    if isinstance(plan, dict) and "round_id" in plan:
        return int(plan["round_id"]), str(plan.get("mode", "train"))
    return None


class ByteLedger:
    """Bytes per (round, mode) on one hop, up (towards the cloud) and down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
        self.total = LinkStats()

    def add(self, key: tuple[int, str] | None, up: int, down: int) -> None:
        self.total.add(up, down)
        if key is None:
            return
        with self._lock:
            c = self._counts[key]
            c[0] += up
            c[1] += down

    def get(self, key: tuple[int, str]) -> dict[str, int]:
        with self._lock:
            up, down = self._counts.get(key, (0, 0))
        return {"up": up, "down": down}


def _reason(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except ValueError:
        detail = resp.text[:200]
    return f"HTTP {resp.status_code}: {detail}"


def auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


class HttpLink(Link):
    """POST /v1/<endpoint> with a msgpack body; the reply is msgpack too."""

    def __init__(self, base_url: str, upward: bool, *, timeout: float = 600.0, max_message_bytes: int = 256 << 20,
                 ledger: ByteLedger | None = None, retry_deadline: float = 30.0, emulator: Any = None,
                 token: str | None = None, verify: str | bool = True) -> None:
        self.base_url, self.upward, self.emulator = base_url.rstrip("/"), upward, emulator
        self.client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0),
                                   headers=auth_headers(token), verify=verify)
        self.max_message_bytes = max_message_bytes
        self.ledger = ledger
        self.retry_deadline = retry_deadline
        self.stats = LinkStats()

    def request(self, endpoint: str, msg: Message) -> Message:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint '{endpoint}'")
        body = encode(msg)
        resp = with_retries(lambda: self.client.post(f"/v1/{endpoint}", content=body,
                                                     headers={"content-type": CONTENT_TYPE}), self.retry_deadline)
        if resp.status_code >= 400:
            raise TransportError(f"{self.base_url}/v1/{endpoint}: {_reason(resp)}", resp.status_code)
        reply = decode(resp.content, max_bytes=self.max_message_bytes)
        up, down = (len(body), len(resp.content)) if self.upward else (len(resp.content), len(body))
        self.stats.add(up, down, endpoint)
        if self.ledger is not None:
            self.ledger.add(round_key(msg), up, down)
        self.emulate(len(body), len(resp.content))
        return reply

    def close(self) -> None:
        self.client.close()


def with_retries(call: Callable[[], httpx.Response], deadline: float, base_delay: float = 0.2) -> httpx.Response:
    """Retry connection errors and 503s with exponential backoff and jitter, until ``deadline`` seconds."""
    end = time.monotonic() + deadline
    delay = base_delay
    while True:
        try:
            resp = call()
            if resp.status_code != 503 or time.monotonic() >= end:
                return resp
            retry_after = resp.headers.get("retry-after")
            wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else delay
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ConnectTimeout, httpx.ReadError) as exc:
            if time.monotonic() >= end:
                raise TransportError(f"could not reach peer: {exc}") from exc
            wait = delay
        time.sleep(min(wait * (0.5 + random.random()), max(0.0, end - time.monotonic())))
        delay = min(delay * 2, 5.0)


def post_json(url: str, payload: dict[str, Any], deadline: float, timeout: float = 30.0, token: str | None = None,
              verify: str | bool = True) -> dict[str, Any]:
    """A JSON control call (registration), retried until the peer answers or the deadline passes."""
    with httpx.Client(timeout=timeout, headers=auth_headers(token), verify=verify) as client:
        resp = with_retries(lambda: client.post(url, json=payload), deadline)
    if resp.status_code >= 400:
        raise TransportError(f"{url}: {_reason(resp)}", resp.status_code)
    return resp.json()


def get_json(url: str, deadline: float, timeout: float = 30.0, token: str | None = None,
             verify: str | bool = True) -> dict[str, Any]:
    with httpx.Client(timeout=timeout, headers=auth_headers(token), verify=verify) as client:
        resp = with_retries(lambda: client.get(url), deadline)
    if resp.status_code >= 400:
        raise TransportError(f"{url}: {_reason(resp)}", resp.status_code)
    return resp.json()


# -- server half ---------------------------------------------------------------------------------

class Auth:
    """Bearer tokens, compared in constant time: the tier token for tier-to-tier calls, the admin token
    for the round API. With ``insecure`` (development mode) nothing is checked."""

    def __init__(self, token: str | None, admin_token: str | None = None, insecure: bool = False) -> None:
        self.token, self.admin_token, self.insecure = token, admin_token, insecure

    @staticmethod
    def _presented(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    @staticmethod
    def _equal(given: str, expected: str | None) -> bool:
        return expected is not None and hmac.compare_digest(given.encode(), expected.encode())

    def peer(self, request: Request) -> None:
        """Tier-to-tier endpoints (and reads): the tier token, or the admin token."""
        if self.insecure:
            return
        given = self._presented(request)
        if given is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not (self._equal(given, self.token) or self._equal(given, self.admin_token)):
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})

    def admin(self, request: Request) -> None:
        """The round API's writes: the admin token only; a tier token is refused with 403."""
        if self.insecure:
            return
        given = self._presented(request)
        if given is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if self._equal(given, self.admin_token):
            return
        if self._equal(given, self.token):
            raise HTTPException(403, "this token may not use the round API: use the admin token")
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})


async def read_message(request: Request, max_bytes: int, endpoint: str,
                       max_tensor_elements: int | None = None) -> tuple[Message, int]:
    """Check content type and size, decode (never unpickling), check the endpoint's required fields."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != CONTENT_TYPE:
        raise HTTPException(415, f"content type must be {CONTENT_TYPE} (got '{ctype or 'none'}')")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(413, f"body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        msg = await anyio.to_thread.run_sync(
            lambda: decode(body, max_bytes=max_bytes, max_tensor_elements=max_tensor_elements))
    except WireError as exc:
        raise HTTPException(400, f"bad message: {exc}") from None
    meta_keys, tensor_keys = REQUIRED.get(endpoint, ((), ()))
    missing = [f"meta.{k}" for k in meta_keys if k not in msg.meta] + [f"tensors.{k}" for k in tensor_keys if k not in msg.tensors]
    if missing:
        raise HTTPException(422, f"{endpoint} message lacks {', '.join(missing)}")
    return msg, len(body)


async def call_handler(fn: Callable[[Message], Message], msg: Message) -> tuple[Response, int]:
    """Run compute off the event loop; map its errors onto 4xx with a JSON reason."""
    try:
        reply = await anyio.to_thread.run_sync(fn, msg)
        body = await anyio.to_thread.run_sync(encode, reply)
    except Busy as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
    except SessionError as exc:
        raise HTTPException(404, str(exc.args[0] if exc.args else exc)) from None
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0] if exc.args else exc)) from None
    except (ValueError, TypeError, WireError) as exc:
        raise HTTPException(422, str(exc)) from None
    except TransportError as exc:
        raise HTTPException(502, f"upstream: {exc}") from None
    return Response(content=body, media_type=CONTENT_TYPE), len(body)


async def serve_message(request: Request, endpoint: str, handler: Callable[[Message], Message], settings: Any,
                        ledger: ByteLedger | None = None) -> Response:
    """A msgpack endpoint: read and check the message, run ``handler`` off the loop, count its bytes."""
    msg, n_in = await read_message(request, settings.max_message_bytes, endpoint, settings.max_tensor_elements)
    resp, n_out = await call_handler(handler, msg)
    if ledger is not None:
        ledger.add(round_key(msg), n_in, n_out)
    return resp


def prometheus(metrics: dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]]) -> str:
    """Prometheus text exposition: ``{name: (type, help, [(labels, value), ...])}``."""
    lines = []
    for name, (kind, help_text, samples) in sorted(metrics.items()):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")
    return "\n".join(lines) + "\n"


def resident_memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class GuardMiddleware:
    """Refuse before any body is read: ``/v1/*`` needs a token (admin routes the admin token), and a
    JSON body over ``max_json_bytes`` gets 413. Msgpack bodies are capped by ``read_message``."""

    def __init__(self, app: Any, auth: Auth, is_admin: Callable[[str, str], bool], max_json_bytes: int = 1 << 20) -> None:
        self.app, self.auth, self.is_admin, self.max_json_bytes = app, auth, is_admin, max_json_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            (self.auth.admin if self.is_admin(scope["method"], scope["path"]) else self.auth.peer)(request)
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != CONTENT_TYPE:
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_json_bytes:
                    raise HTTPException(413, f"a JSON body may hold at most {self.max_json_bytes} bytes")
                receive = self._capped(receive)
        except HTTPException as exc:
            await JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _capped(self, receive: Callable) -> Callable:
        seen = 0

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_json_bytes:
                raise HTTPException(413, f"a JSON body may hold at most {self.max_json_bytes} bytes")
            return message

        return wrapped


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with the errors' locations and messages only (the raw input may be bytes that JSON can't hold)."""
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
    return JSONResponse({"detail": errors}, 422)


def guard(app: Any, auth: Auth, is_admin: Callable[[str, str], bool] = lambda method, path: False) -> None:
    """What every tier's app gets: token checks before body parsing, a JSON body cap, safe 422s."""
    app.add_middleware(GuardMiddleware, auth=auth, is_admin=is_admin)
    app.add_exception_handler(RequestValidationError, validation_error)


def check_url(url: str) -> str:
    """A peer's callback URL: http(s) with a host, or ValueError (a 422 in the request models)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("the URL must be http(s)://host[:port]")
    return url
