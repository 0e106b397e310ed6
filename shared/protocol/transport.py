"""The transport seam: one request/response interface between tiers, in-process or over HTTP."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.errors import ServiceError
from shared.protocol.wire import Message, decode, encode

log = logging.getLogger("splitllm.transport")

ENDPOINTS = ("step", "backward", "start", "update")


def round_key(msg: Message) -> tuple[int, str] | None:
    """The (round, mode) a message belongs to, for per-round byte accounting."""
    meta = msg.meta
    if "round" in meta:  # steps, updates and reports say their mode; a backward request is always training's
        return int(meta["round"]), str(meta.get("mode", "train"))
    plan = meta.get("plan") or (meta.get("plans") or [None])[0]
    if isinstance(plan, dict) and "round_id" in plan:
        return int(plan["round_id"]), str(plan.get("mode", "train"))
    return None


class Handler(Protocol):
    """A tier's compute object as the transport sees it: ``on_<endpoint>(message) -> message``.

    A handler may also have ``after_<endpoint>(request)``, which the transport calls once it has
    counted the request's and the reply's bytes (an edge reports a round's bytes from there).
    """

    def on_step(self, msg: Message) -> Message: ...
    def on_start(self, msg: Message) -> Message: ...
    def on_update(self, msg: Message) -> Message: ...


@dataclass
class LinkStats:
    """Bytes and messages that crossed one link, each way (up = towards the cloud)."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0
    by_endpoint: dict[str, list[int]] = field(default_factory=dict)  # endpoint -> [up, down, messages]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, up: int, down: int, endpoint: str = "") -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down
            self.messages += 1
            counts = self.by_endpoint.setdefault(endpoint, [0, 0, 0])
            counts[0] += up
            counts[1] += down
            counts[2] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "messages": self.messages,
                    "by_endpoint": {k: list(v) for k, v in self.by_endpoint.items()}}


class Link:
    """A caller's handle on one peer tier."""

    stats: LinkStats
    upward: bool  # True when the peer is the caller's parent (user -> edge, edge -> cloud)
    emulator: Any = None  # a shared.protocol.links.LinkEmulator for this hop, or None

    def carry_request(self, nbytes: int) -> float:
        """The hop's link time for a request of ``nbytes``, before the peer gets it (an emulated link waits here);
        its emulated seconds."""
        if self.emulator is None:
            return 0.0
        return self.emulator.transfer(nbytes, upward=self.upward)

    def carry_reply(self, nbytes: int) -> float:
        """The hop's link time for a reply of ``nbytes``, before the caller gets it; its emulated seconds."""
        if self.emulator is None:
            return 0.0
        return self.emulator.transfer(nbytes, upward=not self.upward)

    def request(self, endpoint: str, msg: Message) -> Message:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (nothing to do in-process)."""


class InProcessLink(Link):
    """Direct calls, with every message really encoded and decoded so bytes and dtypes are real.

    With a ``clock`` (``shared.protocol.clock.VirtualClock``) the emulated seconds of each training
    step's requests and replies are charged to that step's (round, user).
    """

    def __init__(self, handler: Any, upward: bool, wire: bool = True, emulator: Any = None, ledger: Any = None,
                 clock: Any = None) -> None:
        self.handler, self.upward, self.wire, self.emulator, self.clock = handler, upward, wire, emulator, clock
        self.ledger = ledger  # the edge's or cloud's ByteLedger, counting this hop as that tier's server does
        self.stats = LinkStats()

    def request(self, endpoint: str, msg: Message) -> Message:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint '{endpoint}'")
        sent = received = 0
        if self.wire:
            data = encode(msg)
            sent = len(data)
            msg = decode(data)
        seconds = self.carry_request(sent)
        reply = getattr(self.handler, f"on_{endpoint}")(msg)
        if self.wire:
            data = encode(reply)
            received = len(data)
            reply = decode(data)
        seconds += self.carry_reply(received)
        if self.upward:
            self.stats.add(sent, received, endpoint)
        else:
            self.stats.add(received, sent, endpoint)
        if self.ledger is not None:
            self.ledger.add(round_key(msg), *((sent, received) if self.upward else (received, sent)))
        if self.clock is not None and endpoint in ("step", "backward") and msg.meta.get("mode", "train") == "train":
            self.clock.charge(int(msg.meta["round"]), str(msg.meta["user"]), "link", seconds)
        after = getattr(self.handler, f"after_{endpoint}", None)
        if after is not None:  # as over HTTP: the reply is the caller's whatever happens next, which is logged
            try:
                after(msg)
            except ServiceError as exc:
                log.error("%s, after its reply: %s", endpoint, exc)
        return reply

