"""The project's own exception types: what a service answers for each (a client's mistake is a 4xx).

Anything raised while serving a request that is not a ``ServiceError`` is a bug of ours: the
service answers 500 with a generic body and logs the traceback.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """An error with an HTTP status and a one-line ``reason`` safe to show to the caller."""

    status: ClassVar[int] = 500
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ClientError(ServiceError):
    """The caller's mistake (4xx): bad bytes, an unknown session, a message that cannot belong here."""

    status = 400


class BadMessage(ClientError, ValueError):
    """Bytes that are not a well-formed message (400)."""

    status = 400


class Forbidden(ClientError):
    """The caller's credential is valid but may not do this (403): it acts as someone else, or outside its role."""

    status = 403


class NotFound(ClientError, LookupError):
    """An unknown session, round, version, edge or user (404)."""

    status = 404


class Conflict(ClientError):
    """The request is well-formed but contradicts the current state (409)."""

    status = 409


class InvalidInput(ClientError, ValueError):
    """A well-formed message or request whose content cannot be accepted (422)."""

    status = 422


class Busy(ServiceError):
    """This tier holds as many sessions as it may: retry later (503 with Retry-After)."""

    status = 503
    headers = {"Retry-After": "5"}


class Starting(ServiceError):
    """The tier is still starting (registering, loading its blocks), or failed to: the reason says (503)."""

    status = 503
    headers = {"Retry-After": "1"}


class UpstreamError(ServiceError):
    """A peer tier answered with an error or could not be reached (502)."""

    status = 502

    def __init__(self, reason: str, upstream_status: int | None = None) -> None:
        super().__init__(reason)
        self.upstream_status = upstream_status


class ModelError(ValueError):
    """A model cannot be resolved or loaded (an undescribed family, a broken config, a missing file).

    The message is one line saying what is wrong and how to fix it; commands print it and exit 2.
    """


def first_line(exc: BaseException) -> str:
    """``Type: the first line of its message``: a third-party exception told in a one-line error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
