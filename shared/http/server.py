"""The HTTP side of the transport seam: an httpx client link, and the server half every tier's app uses."""

from __future__ import annotations

import logging
from typing import Any, Callable

import anyio
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.runtime.session import Busy, SessionError
from shared.protocol.wire import CONTENT_TYPE, Message, WireError, decode, encode
from shared.http.client import TransportError
from shared.http.metrics import ByteLedger, round_key
from shared.http.auth import Auth, GuardMiddleware

log = logging.getLogger("splitllm.http")

# What each endpoint's message must carry, checked before any compute runs.
REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "step": (("round", "user", "step", "mode"), ("hidden", "attention_mask", "labels")),
    "update": (("round", "mode", "num_samples", "metrics"), ()),
    "start": ((), ()),
}




















# -- server half ---------------------------------------------------------------------------------



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








async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with the errors' locations and messages only (the raw input may be bytes that JSON can't hold)."""
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
    return JSONResponse({"detail": errors}, 422)


def guard(app: Any, auth: Auth, is_admin: Callable[[str, str], bool] = lambda method, path: False) -> None:
    """What every tier's app gets: token checks before body parsing, a JSON body cap, safe 422s."""
    app.add_middleware(GuardMiddleware, auth=auth, is_admin=is_admin)
    app.add_exception_handler(RequestValidationError, validation_error)
