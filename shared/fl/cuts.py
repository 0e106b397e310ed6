"""Per-device cuts at an edge: what a user and the edge's replica for it start from, and what their updates add to.

The global state keeps a block's adapters under the tier that the deployment's split points give it
(blocks [0, a) under ``user``, [a, b) under ``edge``). A user whose own cut a_u differs runs blocks
[0, a_u) on its device and the edge runs [a_u, b) for it, so the round's user- and edge-side global
adapters are divided again at a_u (``at_cut``), and after training the two replicas of that user are
put back where the global state keeps them (``restack``). For every block, each user's stream then
trains exactly one replica, on whichever tier ran it, and the edge's pre-aggregation (a mean per
key) combines that block's replicas over its users wherever they lived. With a_u = a both are the
identity.
"""

from __future__ import annotations

from shared.model.adapters import AdapterState, block_of
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier


def on_device(key: str, cut: int) -> bool:
    """A key the device holds at this cut: a block below it, or a head (a U-shaped chain's, the device's)."""
    block = block_of(key)
    return block is None or block < cut


def at_cut(previous: AdapterBundle, cut: int) -> tuple[AdapterState, AdapterState]:
    """The round's user- and edge-side adapters divided at a user's cut: (the device's part, the edge's part)."""
    front = {**previous.get(Tier.USER, {}), **previous.get(Tier.EDGE, {})}
    device = {k: v for k, v in front.items() if on_device(k, cut)}
    return device, {k: v for k, v in front.items() if k not in device}


def restack(device: AdapterState, edge: AdapterState, split_a: int) -> dict[Tier, AdapterState]:
    """One user's trained replicas (its device's and the edge's) as the global state keeps them, by the
    deployment's cut ``split_a``."""
    merged = {**device, **edge}
    user = {k: v for k, v in merged.items() if on_device(k, split_a)}
    return {Tier.USER: user, Tier.EDGE: {k: v for k, v in merged.items() if k not in user}}
