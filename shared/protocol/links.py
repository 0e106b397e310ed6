"""Simulated wireless links: named profiles and an emulator that turns a message's size into link time."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import InvalidInput

PROFILES_FILE = Path(__file__).with_name("link_profiles.json")
PACKET_BYTES = 1500


@dataclass(frozen=True)
class LinkProfile:
    """One hop's conditions. Rates in Mbit/s (up = towards the cloud), times in ms, loss in percent."""

    name: str
    up_mbps: float
    down_mbps: float
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    retransmit_ms: float | None = None  # what one lost packet costs; default one round trip (2 x delay)

    def __post_init__(self) -> None:
        if self.up_mbps <= 0 or self.down_mbps <= 0:
            raise ValueError(f"link profile '{self.name}': rates must be > 0 Mbit/s")
        if self.delay_ms < 0 or self.jitter_ms < 0 or (self.retransmit_ms or 0) < 0 or not 0 <= self.loss_pct < 100:
            raise ValueError(f"link profile '{self.name}': delay, jitter, retransmit >= 0 and loss in [0, 100) %")

    @property
    def loss_cost_seconds(self) -> float:
        return (self.retransmit_ms if self.retransmit_ms is not None else 2 * self.delay_ms) / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, LinkProfile]:
    data = json.loads(path.read_text())
    return {name: LinkProfile(name=name, **values) for name, values in data["profiles"].items()}


def get_profile(name: str | None, overrides: dict[str, Any] | None = None) -> LinkProfile | None:
    """A named profile (``none`` or None: no emulation), with optional custom values on top."""
    if name in (None, "", "none"):
        return None
    profiles = load_profiles()
    if name not in profiles:
        raise InvalidInput(f"unknown link profile '{name}'; known: {', '.join(sorted(profiles))} (or 'none')")
    profile = profiles[name]
    if overrides:
        profile = LinkProfile(**{**profile.to_dict(), **overrides})
    return profile


def link_emulator(name: str | None, seed: int, *, rate_shaped: bool = False, sleep: bool = True) -> "LinkEmulator | None":
    """The emulator of a named profile (None for ``none``). With ``rate_shaped`` the network itself (tc)
    paces the bytes at the profile's rates, and the emulator adds only its delay, jitter and loss."""
    profile = get_profile(name, {"up_mbps": math.inf, "down_mbps": math.inf} if rate_shaped else None)
    return LinkEmulator(profile, seed=seed, sleep=sleep) if profile else None


@dataclass
class LinkClock:
    """Link time and bytes accumulated on one hop, each way."""

    seconds_up: float = 0.0
    seconds_down: float = 0.0
    lost_packets: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {"seconds_up": self.seconds_up, "seconds_down": self.seconds_down, "lost_packets": self.lost_packets}


class LinkEmulator:
    """time = size / rate + delay +- jitter, plus one retransmission (a round trip) per lost packet.

    ``transfer`` returns the seconds a message of ``nbytes`` spends on the link; with ``sleep=True``
    it also waits until the message has arrived (the services really delay the bytes), otherwise the
    caller keeps a virtual clock (the simulator). Serialisation time is real either way: it is spent encoding.

    Waiting, a link carries one message's bytes at a time each way, as a real link does: a message sent
    while others are on the link that way waits until their bytes have gone (size / rate each), then its own
    bytes go, then its delay, jitter and retransmissions pass (these overlap with the next message's bytes).
    So messages sent at the same time (a pipeline's micro-batches) share the link's rate, and only its
    latency overlaps. The seconds returned and counted are the message's own, without the wait for the link.
    """

    def __init__(self, profile: LinkProfile, seed: int = 0, sleep: bool = True) -> None:
        self.profile, self.sleep = profile, sleep
        self.rng = random.Random(seed)
        self.clock = LinkClock()
        self._lock = threading.Lock()
        self._free_at = {True: 0.0, False: 0.0}  # monotonic time when the link is done with the bytes sent each way

    def rate_seconds(self, nbytes: int, upward: bool) -> float:
        """The time the link's rate takes for ``nbytes`` one way."""
        p = self.profile
        return nbytes / ((p.up_mbps if upward else p.down_mbps) * 1e6 / 8)

    def link_seconds(self, nbytes: int, upward: bool) -> tuple[float, int]:
        p = self.profile
        with self._lock:
            jitter = self.rng.uniform(-p.jitter_ms, p.jitter_ms) if p.jitter_ms else 0.0
            packets = max(1, math.ceil(nbytes / PACKET_BYTES))
            lost = _binomial(self.rng, packets, p.loss_pct / 100.0)
        seconds = self.rate_seconds(nbytes, upward) + max(0.0, p.delay_ms + jitter) / 1000.0 + lost * p.loss_cost_seconds
        return seconds, lost

    def transfer(self, nbytes: int, upward: bool) -> float:
        seconds, lost = self.link_seconds(nbytes, upward)
        with self.clock._lock:
            if upward:
                self.clock.seconds_up += seconds
            else:
                self.clock.seconds_down += seconds
            self.clock.lost_packets += lost
        if self.sleep and seconds > 0:
            time.sleep(self._queue(nbytes, upward) + seconds)
        return seconds

    def _queue(self, nbytes: int, upward: bool) -> float:
        """Seconds until the link is free for these bytes one way (0 when it is idle); books the link for them."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at[upward])
            self._free_at[upward] = start + self.rate_seconds(nbytes, upward)
        return start - now


def _binomial(rng: random.Random, n: int, p: float) -> int:
    if p <= 0:
        return 0
    if n * p > 50:  # normal approximation for large messages
        return max(0, round(rng.gauss(n * p, math.sqrt(n * p * (1 - p)))))
    return sum(1 for _ in range(n) if rng.random() < p)
