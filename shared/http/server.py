"""The server half every tier's app uses: reading msgpack bodies, running handlers, mapping errors to statuses."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask

from shared.errors import ServiceError, Starting
from shared.http.auth import Auth, GuardMiddleware
from shared.http.bodies import incoming_message
from shared.http.credentials import Principal
from shared.http.metrics import ByteLedger
from shared.protocol.transport import round_key
from shared.protocol.wire import CONTENT_TYPE, Message, encode

log = logging.getLogger("splitllm.http")

INTERNAL_ERROR = "internal error; the service logged the details"

Handler = Callable[[Message], Message]
Authorize = Callable[[Message, Principal], None]  # raises Forbidden when the caller may not send this message


async def off_loop(fn: Callable[[Any], Any], arg: Any, what: str) -> Any:
    """``fn(arg)`` in a worker thread. The project's errors keep their status (``ServiceError``); any other
    exception is our bug: 500 with a generic body, the traceback in the log."""
    try:
        return await anyio.to_thread.run_sync(fn, arg)
    except ServiceError:
        raise
    except Exception:
        log.exception("internal error serving %s", what)
        raise HTTPException(500, INTERNAL_ERROR) from None


async def call_handler(fn: Handler, msg: Message, what: str = "", status_code: int = 200) -> tuple[Response, int]:
    """Run compute off the event loop and encode its reply (errors as ``off_loop`` maps them)."""
    what = what or getattr(fn, "__name__", "a request")
    body = await off_loop(encode, await off_loop(fn, msg, what), what)
    return Response(content=body, status_code=status_code, media_type=CONTENT_TYPE), len(body)


async def serve_message(request: Request, handler: Handler, settings: Any, ledger: ByteLedger | None = None,
                        status_code: int = 200, authorize: Authorize | None = None,
                        after: Callable[[Message], None] | None = None) -> Response:
    """A msgpack endpoint: read the message (``shared.http.bodies``), check the caller may send it, run ``handler``
    off the loop, count its bytes; then, the body's memory released and the reply sent, run ``after(message)`` (a
    handler's ``after_<endpoint>``, see ``shared.protocol.transport.Handler``)."""
    async with incoming_message(request, settings) as (msg, n_in):
        caller = getattr(request.state, "principal", None)
        if authorize is not None and caller is not None:
            authorize(msg, caller)
        resp, n_out = await call_handler(handler, msg, request.url.path, status_code)
        if ledger is not None:
            ledger.add(round_key(msg), n_in, n_out)
    if after is not None:
        resp.background = BackgroundTask(after_reply, after, msg, request.url.path)
    return resp


async def after_reply(after: Callable[[Message], None], msg: Message, path: str) -> None:
    """A handler's ``after_<endpoint>`` once the reply has gone: the caller has its answer, so a failure here (an
    edge's report that the cloud refused, or could not be reached for) is logged, not answered."""
    try:
        await off_loop(after, msg, f"{path} (after its reply)")
    except (ServiceError, HTTPException) as exc:
        log.error("%s, after its reply: %r", path, str(getattr(exc, "detail", exc)))  # a client's words, newlines escaped


def msgpack_route(app: FastAPI, endpoint: str, run: Callable[[Request, str], Awaitable[Response]],
                  status_code: int = 200, summary: str = "") -> None:
    """``POST /v1/<endpoint>``, a msgpack body in and out, served by ``run(request, endpoint)``."""

    async def route(request: Request) -> Response:
        return await run(request, endpoint)

    app.add_api_route(f"/v1/{endpoint}", route, methods=["POST"], status_code=status_code, name=endpoint,
                      summary=summary or f"{endpoint} (application/x-msgpack)")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with the errors' locations and messages only (the raw input may be bytes that JSON can't hold)."""
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
    return JSONResponse({"detail": errors}, 422)


async def service_error(request: Request, exc: ServiceError) -> JSONResponse:  # type: ignore[override]
    """A ``ServiceError`` from a route: its status and reason."""
    return JSONResponse({"detail": exc.reason}, exc.status, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is a bug of ours: 500, a generic body, the traceback in the log."""
    log.error("internal error serving %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": INTERNAL_ERROR}, 500)


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, with or without parameters."""
    ctype = content_type.split(";")[0].strip().lower()
    return ctype == "application/json" or ctype.startswith("application/") and ctype.endswith("+json")


class JsonRoute(APIRoute):
    """A route whose JSON body is refused with 415, before it is read, when the request declares another type.

    The guard caps every body at ``max_json_bytes`` unless it is sent as msgpack, which the msgpack routes read
    within their own limits; FastAPI would read a msgpack body sent to a JSON route whole, into memory."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def json_only(request: Request) -> Response:
            declared = request.headers.get("content-type")
            if declared is not None and not is_json(declared):
                raise HTTPException(415, f"content type must be application/json (got '{declared[:64]}')")
            return await handler(request)

        return json_only


def guard(app: Any, auth: Auth) -> None:
    """What every tier's app gets: credential checks before body parsing, a JSON body cap, safe 4xx and 500 bodies."""
    app.add_middleware(GuardMiddleware, auth=auth)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(Exception, internal_error)


def service_app(title: str, description: str, make: Callable[[], Any], auth: Auth) -> tuple[FastAPI, Callable[[], Any]]:
    """A tier's FastAPI app whose service object is made at start-up (lifespan) and closed at shutdown.

    Returns the app and ``current()``, which gives the service or answers 503 while it starts.
    """
    holder: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder["svc"] = app.state.service = make()
        yield
        close = getattr(holder.pop("svc"), "close", None)
        if close is not None:
            close()

    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan, description=description)
    app.router.route_class = JsonRoute
    guard(app, auth)

    def current() -> Any:
        if "svc" not in holder:
            raise HTTPException(503, f"the {title} is starting", headers={"Retry-After": "1"})
        return holder["svc"]

    return app, current


class BackgroundStart:
    """A tier that starts in a thread of its own (registering, loading its blocks) and says how far it got.

    A subclass sets ``tier``, does its work in ``start`` and says in ``started`` whether it is done;
    an exception in ``start`` is kept in ``error`` (shown by ``/healthz``) and the process stays up.
    """

    tier = ""

    def __init__(self) -> None:
        self.error: str | None = None
        threading.Thread(target=self._start, name=f"{self.tier}-start", daemon=True).start()

    def _start(self) -> None:
        try:
            self.start()
        except Exception as exc:  # reported by /healthz; the process stays up to say why
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("%s start-up failed: %s", self.tier, self.error)

    def start(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def started(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def starting(self) -> Starting:
        """The 503 to answer while the tier is not ready: why (the start-up error), or that it is starting."""
        return Starting(self.error or f"the {self.tier} is starting")

    def health(self, **fields: Any) -> JSONResponse:
        """``/healthz``: 200 once the tier can serve, 503 (with the reason in the body) until then."""
        ready = self.started
        body = {"status": "ok" if ready else ("error" if self.error else "starting"), "tier": self.tier, **fields,
                "error": self.error}
        return JSONResponse(body, status_code=200 if ready else 503)
