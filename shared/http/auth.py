"""Who may call a tier: credentials checked before any body is read, per-route roles, body digests, callback URLs.

Production: every tier-to-tier request is signed with the caller's own credential
(``shared.http.credentials``); an admin sends a signed bearer credential. Development
(``--insecure-dev``): the shared ``token`` / ``admin_token`` bearer secrets if set, else nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import math
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from shared.errors import Forbidden
from shared.http.credentials import (CERT_HEADER, EMPTY_DIGEST, SIGNATURE_HEADER, SIGNED_HEADER, CredentialError,
                                     Principal, TooManyRequests, Verifier)
from shared.protocol.wire import CONTENT_TYPE


@dataclass(frozen=True)
class Rule:
    """``method path`` (a regex matched in full) may be called by ``roles``."""

    method: str
    path: str
    roles: frozenset[str]

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and re.fullmatch(self.path, path) is not None


def rule(method: str, path: str, *roles: str) -> Rule:
    return Rule(method, path, frozenset(roles))


class Auth:
    """One tier's authentication (who calls) and route-level authorization (may that role call this route).

    ``audiences`` are the names a signed request must have been meant for (``cloud``, ``edge:<id>``,
    ``user:<id>``); ``route_audiences`` are names taken on the routes of their rule only (an edge's bare
    ``edge``, which a user signs for its first ``GET /v1/spec``, before it knows the edge's id). Identity
    checks finer than the role (a user may step only its own sessions) are the routes' own, with the
    principal this puts in ``request.state.principal``.
    """

    def __init__(self, verifier: Verifier | None, audiences: Iterable[str], rules: Iterable[Rule],
                 insecure: bool = False, token: str | None = None, admin_token: str | None = None,
                 route_audiences: Iterable[tuple[str, Rule]] = ()) -> None:
        self.verifier, self.audiences, self.rules = verifier, frozenset(audiences), tuple(rules)
        self.route_audiences = tuple(route_audiences)
        self.insecure, self.token, self.admin_token = insecure, token, admin_token
        if not insecure and verifier is None:
            raise ValueError("a tier outside development mode needs a trust key to verify credentials")

    def roles(self, method: str, path: str) -> frozenset[str] | None:
        return next((r.roles for r in self.rules if r.matches(method, path)), None)

    def check(self, headers: Headers, method: str, signed_path: str, path: str) -> tuple[Principal | None, str | None]:
        """The caller and the body digest its signature covers (None in development mode); HTTPException if refused."""
        roles = self.roles(method, path)
        if roles is None:
            raise HTTPException(404, f"no route {method[:16]} {path[:200]}")
        bearer = bearer_of(headers)
        if self.insecure:
            self._check_shared(bearer, "admin" in roles and "edge" not in roles and "user" not in roles)
            return None, None
        verifier = self.verifier
        if verifier is None:
            raise RuntimeError("no verifier outside development mode")  # the constructor refuses this
        try:
            if bearer is not None:
                principal, digest = verifier.bearer(bearer), None
            elif "admin" in roles and not any(headers.get(h) for h in (CERT_HEADER, SIGNED_HEADER, SIGNATURE_HEADER)):
                raise CredentialError("missing credential: an admin sends its token as 'Authorization: Bearer <token>'"
                                      + ("" if roles == {"admin"} else "; a tier signs its request with its credential"))
            else:
                audiences = self.audiences | {a for a, r in self.route_audiences if r.matches(method, path)}
                principal, digest = verifier.request(headers, method, signed_path, audiences)
        except TooManyRequests as exc:
            raise HTTPException(429, exc.reason, headers={"Retry-After": str(math.ceil(exc.retry_after))}) from None
        except CredentialError as exc:
            raise HTTPException(401, exc.reason, headers={"WWW-Authenticate": "SplitLLM"}) from None
        if principal.role not in roles:
            raise HTTPException(403, f"a {principal.role} credential may not call {method} {path}")
        return principal, digest

    def _check_shared(self, given: str | None, admin_only: bool) -> None:
        """Development mode: the shared secrets where they are set (the admin's for the round API)."""
        expected = [self.admin_token] if admin_only else [self.token, self.admin_token]
        if not any(expected):
            return
        if given is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if any(e is not None and hmac.compare_digest(given.encode(), e.encode()) for e in expected):
            return
        if admin_only and self.token is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(403, "this token may not use the round API: use the admin token")
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})


def bearer_of(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class GuardMiddleware:
    """Refuse before any body is read: ``/v1/*`` needs a credential the route allows, a JSON body over
    ``max_json_bytes`` gets 413, and a body that is not the one signed gets 401 (checked as it is read)."""

    def __init__(self, app: Any, auth: Auth, max_json_bytes: int = 1 << 20) -> None:
        self.app, self.auth, self.max_json_bytes = app, auth, max_json_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        raw = scope.get("raw_path") or scope["path"].encode()
        signed_path = raw.decode("latin-1") + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
        try:
            principal, digest = self.auth.check(headers, scope["method"], signed_path, scope["path"])
            if digest is not None and scope["method"] in ("GET", "HEAD") and digest != EMPTY_DIGEST:
                raise HTTPException(401, "the signed body digest does not match the request",
                                    headers={"WWW-Authenticate": "SplitLLM"})
            json_body = headers.get("content-type", "").split(";")[0].strip().lower() != CONTENT_TYPE
            if json_body:
                declared = headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_json_bytes:
                    raise HTTPException(413, f"a JSON body may hold at most {self.max_json_bytes} bytes")
            receive = self._checked(receive, self.max_json_bytes if json_body else None, digest)
        except HTTPException as exc:
            await JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    @staticmethod
    def _checked(receive: Callable, cap: int | None, digest: str | None) -> Callable:
        """``receive`` that caps a JSON body and checks, at its last chunk, that the body is the one signed."""
        if cap is None and digest is None:
            return receive
        seen, sha = 0, hashlib.sha256()

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            body = message.get("body", b"")
            seen += len(body)
            if cap is not None and seen > cap:
                raise HTTPException(413, f"a JSON body may hold at most {cap} bytes")
            if digest is not None:
                sha.update(body)
                if message.get("type") == "http.request" and not message.get("more_body", False) \
                        and sha.hexdigest() != digest:
                    raise HTTPException(401, "the body is not the one the request signature covers",
                                        headers={"WWW-Authenticate": "SplitLLM"})
            return message

        return wrapped


def principal_of(request: Any) -> Principal | None:
    """The verified caller of a request (None in development mode)."""
    return getattr(request.state, "principal", None)


def require_identity(principal: Principal | None, ident: Any, what: str) -> None:
    """A caller may act only as itself: ``Forbidden`` (403) when its credential names another id."""
    if principal is not None and principal.id != ident:
        raise Forbidden(f"a credential for '{principal.id}' may not act as {what} '{str(ident)[:64]}'")


# -- callback URLs ----------------------------------------------------------------------------------------------

METADATA_HOSTS = ("metadata", "metadata.google.internal", "metadata.azure.com", "instance-data", "169.254.169.254",
                  "fd00:ec2::254", "100.100.100.200")


def check_url(url: str) -> str:
    """A peer's callback URL: http(s) with a host, or ValueError (a 422 in the request models)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("the URL must be http(s)://host[:port]")
    return url


def host_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a host name stands for, as the system would resolve it (legacy IPv4 spellings such as
    ``2852039166`` or ``0xa9.0xfe.0xa9.0xfe`` included); empty when it does not resolve."""
    try:
        found = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            found = [ipaddress.ip_address(socket.inet_ntoa(socket.inet_aton(host)))]
        except OSError:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except (socket.gaierror, UnicodeError, ValueError):
                return []
            found = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    return [a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else a for a in found]


def callback_allowed(url: str, allowed_hosts: Iterable[str]) -> str | None:
    """Why a callback URL is refused (None if allowed): link-local and cloud metadata addresses always are,
    whatever the host's spelling (it is resolved as the system would); otherwise the host must match one of
    ``allowed_hosts`` (shell patterns, ``*`` for any). A name that resolves differently later (DNS rebinding)
    is out of this check's reach: restrict ``allowed_hosts`` where that matters."""
    host = httpx.URL(url).host.lower().strip("[]").rstrip(".")
    if host in METADATA_HOSTS:
        return f"'{host}' is a cloud metadata address"
    for address in host_addresses(host):
        if str(address) in METADATA_HOSTS:
            return f"'{host}' is a cloud metadata address ({address})"
        if address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved:
            return f"'{host}' is a link-local, multicast, unspecified or reserved address ({address})"
    if not any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in allowed_hosts):
        return f"'{host}' is not in the allowed callback hosts ({', '.join(allowed_hosts)})"
    return None
