"""The simulator runs a round as the services do: the users of an edge train at the same time, each in a
thread of its own, through the same code as an HTTP user; a user that fails tells its edge at once."""

from __future__ import annotations

import threading
import time

from shared.fl import SessionPlugin, register_algorithm

SPANS: list[tuple[str, str, float, float]] = []  # user, thread, start, end of one slow user-tier step


class SlowUserSteps(SessionPlugin):
    """Makes every user-tier step take at least 50 ms, and records when and where it ran."""

    def after_backward(self, params):
        if self.ctx.tier == "user":
            start = time.monotonic()
            time.sleep(0.05)
            SPANS.append((self.plan.user_id, threading.current_thread().name, start, time.monotonic()))


class FailingUser(SessionPlugin):
    """user-1's training breaks on its own device."""

    def after_backward(self, params):
        if self.ctx.tier == "user" and self.plan.user_id == "user-1":
            raise RuntimeError("injected device failure")


register_algorithm("test-slow-user-steps", session=SlowUserSteps)
register_algorithm("test-failing-user", session=FailingUser)


def test_users_of_an_edge_train_concurrently_in_threads_of_their_own(small_sim) -> None:
    SPANS.clear()
    sim = small_sim(users=2, edges=1, local_steps=4, algorithm="test-slow-user-steps")
    sim.run_round(sim.request(evaluate=False))
    by_user = {u: [(s, e) for uu, _, s, e in SPANS if uu == u] for u in ("user-0", "user-1")}
    assert all(len(spans) == 4 for spans in by_user.values())
    threads = {u: {t for uu, t, _, _ in SPANS if uu == u} for u in by_user}
    assert threads["user-0"].isdisjoint(threads["user-1"])
    assert threading.main_thread().name not in threads["user-0"] | threads["user-1"]
    first, second = by_user["user-0"], by_user["user-1"]
    assert first[0][0] < second[-1][1] and second[0][0] < first[-1][1]  # each began before the other finished


def test_a_failing_user_is_dropped_at_once_not_at_the_deadline(small_sim) -> None:
    sim = small_sim(users=2, edges=1, algorithm="test-failing-user", deadline=600.0, min_participants=1)
    started = time.monotonic()
    record = sim.run_record(sim.request(evaluate=False))
    assert time.monotonic() - started < 120  # the deadline is 600 s
    assert record.state == "committed", record.error
    assert record.metrics["dropped"] == ["user-1"] and record.progress["user-1"] == "dropped"
    agent = next(u for u in sim.users if u.user_id == "user-1")
    assert agent.jobs == {f"{record.round_id}:train": "failed"} and "injected device failure" in agent.last_error
