"""A user slow to accept its round's start (a frozen device, or one that means harm) holds up no other user: an edge
starts its users at once, and the cloud its edges (over HTTP a start also waits at most the edge's
``start_timeout``). The simulator runs the services' code path."""

from __future__ import annotations

import time

from shared.config.round import RoundConfig
from shared.lab.sim import SimConfig, Simulation
from user_agent.compute import UserAgent

SLOW = 3.0
started: dict[str, float] = {}


class Timed(UserAgent):
    """Notes when its start arrives."""

    def on_start(self, msg):  # noqa: ANN001, ANN201
        started.setdefault(self.user_id, time.monotonic())
        return super().on_start(msg)


class Sluggish(Timed):
    """Takes SLOW seconds to accept its start."""

    def on_start(self, msg):  # noqa: ANN001, ANN201
        started.setdefault(self.user_id, time.monotonic())
        time.sleep(SLOW)
        return super().on_start(msg)


def test_a_user_slow_to_accept_its_start_holds_up_no_other_user(hermetic_cache) -> None:
    sim = Simulation(SimConfig(model="tiny-bert", data="trec", users=4, edges=2, rounds=1, split=(1, 3),
                               round=RoundConfig(local_steps=1, batch_size=2, evaluate=False), max_len=16,
                               max_examples_per_client=8, baseline_eval=False))
    for user in sim.users:  # user i is behind edge i % 2: user-0 and user-2 share edge-0, which the cloud starts first
        user.__class__ = Sluggish if user.user_id == "user-0" else Timed
    started.clear()
    t0 = time.monotonic()
    record = sim.run_record()
    assert record.state == "committed", record.error
    late = {u: round(t - t0, 2) for u, t in started.items() if t - t0 > SLOW / 2 and u != "user-0"}
    assert set(started) == {"user-0", "user-1", "user-2", "user-3"} and not late, late
