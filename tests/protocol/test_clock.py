"""The virtual clock's arithmetic: blocks x block cost x the device's slowdown, plus link seconds, per (round, user)."""

from __future__ import annotations

import pytest

from shared.protocol.clock import VirtualClock


def test_blocks_cost_the_block_time_times_the_devices_slowdown_on_the_user_tier_only() -> None:
    clock = VirtualClock(0.01, {"slow": 4.0})
    clock.charge_blocks("user", 1, "slow", 3)  # 3 blocks on a 4x device: 0.12 s
    clock.charge_blocks("edge", 1, "slow", 2)  # the edge and the cloud run at 1x
    clock.charge_blocks("cloud", 1, "slow", 1)
    clock.charge(1, "slow", "link", 0.005)
    assert clock.account(1, "slow") == pytest.approx({"user": 0.12, "edge": 0.02, "cloud": 0.01, "link": 0.005})
    assert clock.elapsed(1, "slow") == pytest.approx(0.155)
    clock.charge_blocks("user", 1, "fast", 3)  # a user without a factor is a 1x device
    assert clock.elapsed(1, "fast") == pytest.approx(0.03)
    assert clock.elapsed(2, "slow") == 0.0 and clock.account(2, "slow")["user"] == 0.0  # accounts per (round, user)
    assert clock.block_cost("user", "slow", 5) == pytest.approx(0.2)


def test_bad_clock_input_is_refused() -> None:
    with pytest.raises(ValueError, match="block_seconds"):
        VirtualClock(0.0)
    with pytest.raises(ValueError, match="unknown part"):
        VirtualClock(0.01).charge(1, "u", "disk", 1.0)


def test_a_link_charges_the_training_steps_messages_and_nothing_else() -> None:
    from shared.protocol.transport import InProcessLink
    from shared.protocol.wire import Message

    class Handler:  # answers every endpoint with an empty message
        def __getattr__(self, name: str):
            return lambda msg: Message("ok")

    class Emulator:  # every transfer, request or reply, takes 1 ms
        def transfer(self, size: int, upward: bool) -> float:
            return 0.001

    clock = VirtualClock(0.01)
    link = InProcessLink(Handler(), upward=True, emulator=Emulator(), clock=clock)
    link.request("step", Message("step", {"round": 1, "user": "u", "step": 0, "mode": "train"}))
    link.request("backward", Message("backward", {"round": 1, "user": "u", "step": 0, "loss": 1.0}))  # U-shaped
    link.request("step", Message("step", {"round": 1, "user": "u", "step": 0, "mode": "eval"}))
    link.request("update", Message("update", {"round": 1, "user": "u", "mode": "train"}))
    assert clock.account(1, "u")["link"] == pytest.approx(0.004)  # two training messages, each a request and a reply
