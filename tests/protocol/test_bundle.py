"""The adapter bundle: the one place that writes and reads the ``<tier>/`` prefix of adapter tensor names."""

from __future__ import annotations

import pytest
import torch

from shared.errors import InvalidInput
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier


def test_prefixes_round_trip() -> None:
    bundle = AdapterBundle({"user": {"blocks.0.q.lora_A.weight": torch.ones(2)}, Tier.CLOUD: {"head.w": torch.zeros(1)}})
    names = bundle.tensors()
    assert set(names) == {"user/blocks.0.q.lora_A.weight", "cloud/head.w"}
    back = AdapterBundle.from_tensors(names)
    assert set(back) == set(Tier) and back[Tier.EDGE] == {}  # every allowed tier is present, empty where none came
    assert torch.equal(back["user"]["blocks.0.q.lora_A.weight"], torch.ones(2))
    assert set(bundle.tensors([Tier.CLOUD])) == {"cloud/head.w"}


@pytest.mark.parametrize("name", ["user", "user/", "gpu/x", "x", "/x"])
def test_a_name_without_an_allowed_prefix_is_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="not an adapter of this message"):
        AdapterBundle.from_tensors({name: torch.ones(1)})


def test_tiers_limit_what_a_message_may_carry() -> None:
    with pytest.raises(InvalidInput):
        AdapterBundle.from_tensors({"cloud/x": torch.ones(1)}, (Tier.USER, Tier.EDGE))
