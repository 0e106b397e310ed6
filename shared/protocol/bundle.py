"""Adapters of several tiers in one message: the only place that knows the ``<tier>/`` key prefix."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from shared.errors import InvalidInput
from shared.protocol.enums import Tier

AdapterState = dict[str, torch.Tensor]


class AdapterBundle(Mapping[Tier, AdapterState]):
    """``{tier: adapter state}``; on the wire and on disk its tensors are named ``<tier>/<key>``.

    A bundle maps only the tiers it was given: ``bundle[Tier.USER]`` of a bundle without user
    adapters raises KeyError, ``bundle.get(Tier.USER, {})`` does not.
    """

    def __init__(self, states: Mapping[Tier | str, AdapterState] | None = None) -> None:
        self._states: dict[Tier, AdapterState] = {Tier(t): dict(s) for t, s in (states or {}).items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], tiers: Iterable[Tier | str] = tuple(Tier)) -> "AdapterBundle":
        """Split ``<tier>/<key>`` names into per-tier states; a name of another form is refused (422)."""
        allowed = [Tier(t) for t in tiers]
        states: dict[Tier, AdapterState] = {t: {} for t in allowed}
        for name, value in tensors.items():
            tier, sep, key = name.partition("/")
            if not sep or not key or tier not in states:
                expected = " or ".join(f"'{t.value}/<key>'" for t in allowed)
                raise InvalidInput(f"tensor '{name[:80]}' is not an adapter of this message: expected {expected}")
            states[Tier(tier)][key] = value
        return cls(states)

    def tensors(self, tiers: Iterable[Tier | str] | None = None) -> dict[str, torch.Tensor]:
        """The bundle's tensors under their ``<tier>/<key>`` names (all tiers, or only ``tiers``)."""
        chosen = self._states if tiers is None else {Tier(t): self._states.get(Tier(t), {}) for t in tiers}
        return {f"{tier.value}/{key}": value for tier, state in chosen.items() for key, value in state.items()}

    def __getitem__(self, tier: Tier | str) -> AdapterState:
        return self._states[Tier(tier)]

    def __iter__(self) -> Iterator[Tier]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        return f"AdapterBundle({ {t.value: len(s) for t, s in self._states.items()} })"
