"""Who may call a tier: bearer tokens checked in constant time before any body is read, and peer URL checks."""

from __future__ import annotations

import hmac
from typing import Any, Callable

import httpx
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from shared.protocol.wire import CONTENT_TYPE


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




def check_url(url: str) -> str:
    """A peer's callback URL: http(s) with a host, or ValueError (a 422 in the request models)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("the URL must be http(s)://host[:port]")
    return url
