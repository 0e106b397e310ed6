"""The link emulator: a profile's time for a message, and only delay, jitter and loss where tc paces the rate."""

from __future__ import annotations

import pytest

from shared.errors import InvalidInput
from shared.protocol.links import get_profile, link_emulator


def test_a_message_takes_its_size_over_the_rate_plus_the_delay() -> None:
    p = get_profile("fiber")  # no loss: the time is exact up to the jitter
    emulator = link_emulator("fiber", seed=1, sleep=False)
    seconds, lost = emulator.link_seconds(1_000_000, upward=True)
    rate_seconds = 1_000_000 * 8 / (p.up_mbps * 1e6)
    assert lost == 0
    assert rate_seconds + (p.delay_ms - p.jitter_ms) / 1e3 <= seconds <= rate_seconds + (p.delay_ms + p.jitter_ms) / 1e3


def test_rate_shaped_links_add_only_delay_jitter_and_loss() -> None:
    """Same seed, same draws of jitter and loss: the two differ by exactly the time at the profile's rate."""
    p = get_profile("4g")
    full = link_emulator("4g", seed=1, sleep=False)
    shaped = link_emulator("4g", seed=1, rate_shaped=True, sleep=False)
    for nbytes, upward in ((1_000, True), (1_000_000, True), (3_000_000, False)):
        (t_full, lost_full), (t_shaped, lost_shaped) = full.link_seconds(nbytes, upward), shaped.link_seconds(nbytes, upward)
        rate = p.up_mbps if upward else p.down_mbps
        assert lost_full == lost_shaped
        assert t_full - t_shaped == pytest.approx(nbytes * 8 / (rate * 1e6))
        assert t_shaped >= (p.delay_ms - p.jitter_ms) / 1e3


def test_none_is_no_emulator_and_an_unknown_profile_is_refused() -> None:
    assert link_emulator("none", seed=0) is None and link_emulator(None, seed=0, rate_shaped=True) is None
    with pytest.raises(InvalidInput, match="unknown link profile"):
        link_emulator("3g", seed=0)


def test_messages_sent_one_way_at_the_same_time_share_the_rate_and_each_way_has_its_own() -> None:
    emulator = link_emulator("4g", seed=0)
    p = emulator.profile
    one = 1_000_000 * 8 / (p.up_mbps * 1e6)  # a megabyte up at 4g's rate: 0.8 s
    assert emulator._queue(1_000_000, upward=True) == 0.0
    assert emulator._queue(1_000_000, upward=True) == pytest.approx(one, abs=0.05)  # behind the first one's bytes
    assert emulator._queue(1_000_000, upward=True) == pytest.approx(2 * one, abs=0.05)
    assert emulator._queue(1_000_000, upward=False) == 0.0  # the other way is free


def test_a_request_reaches_its_peer_only_after_its_link_time() -> None:
    import time

    from shared.protocol.transport import InProcessLink
    from shared.protocol.wire import Message

    class Peer:
        def on_step(self, msg: Message) -> Message:
            self.arrived = time.monotonic()
            return Message("ok")

    peer = Peer()
    link = InProcessLink(peer, upward=True, emulator=link_emulator("fiber", seed=0))
    sent = time.monotonic()
    link.request("step", Message("step", meta={"round": 0}))
    assert peer.arrived - sent >= (get_profile("fiber").delay_ms - get_profile("fiber").jitter_ms) / 1e3
