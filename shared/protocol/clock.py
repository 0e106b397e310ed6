"""A virtual clock for simulated training: compute by the blocks a step runs, links by their profiles.

Wall time on a shared machine is noise (identical rounds took 6 s to 63 s here), and a simulated
slow device that sleeps multiplies it. The simulator can instead charge each training step:

* compute: a block's forward and backward cost ``block_seconds`` on a 1x machine, and
  ``block_seconds * slowdown`` on a device that is ``slowdown`` times slower. The user tier runs
  at its device's factor, the edge and the cloud at 1x. Embeddings and the head are not charged.
* links: the emulated seconds of the step's messages (each request and its reply, a U-shaped
  step's backward request too) on every hop they cross (``shared.protocol.links.LinkEmulator``),
  where a hop has a profile.

Each (round, user) has its own account, so users that train at the same time never mix; a step's
time is what its account grew by while it ran. Evaluation is not charged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

PARTS = ("user", "edge", "cloud", "link")


@dataclass
class VirtualClock:
    """Seconds charged per (round, user), by part: the tiers' compute and the links."""

    block_seconds: float
    slowdowns: dict[str, float] = field(default_factory=dict)  # user id -> its device's factor (1 if absent)
    _accounts: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.block_seconds > 0:
            raise ValueError(f"a virtual clock needs block_seconds > 0 (got {self.block_seconds})")

    def block_cost(self, tier: str, user_id: str, blocks: int) -> float:
        """Seconds of ``blocks`` blocks (forward and backward) on ``tier`` for ``user_id``'s step."""
        factor = self.slowdowns.get(user_id, 1.0) if tier == "user" else 1.0
        return blocks * self.block_seconds * factor

    def charge(self, round_id: int, user_id: str, part: str, seconds: float) -> None:
        if part not in PARTS:
            raise ValueError(f"unknown part '{part}'; one of {PARTS}")
        with self._lock:
            account = self._accounts.setdefault((round_id, user_id), dict.fromkeys(PARTS, 0.0))
            account[part] += seconds

    def charge_blocks(self, tier: str, round_id: int, user_id: str, blocks: int) -> None:
        self.charge(round_id, user_id, tier, self.block_cost(tier, user_id, blocks))

    def account(self, round_id: int, user_id: str) -> dict[str, float]:
        """The seconds charged so far to (round, user), by part."""
        with self._lock:
            return dict(self._accounts.get((round_id, user_id), dict.fromkeys(PARTS, 0.0)))

    def elapsed(self, round_id: int, user_id: str) -> float:
        return sum(self.account(round_id, user_id).values())
