"""DevFT through the services' real HTTP routes (in-process apps): stages grow, versions take each stage's shape,
round metrics show the stage, the layers each tier ran, compute seconds and bytes."""

from __future__ import annotations

import pytest
from safetensors.torch import load

from shared.fl.devft import block_ids
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import Tier
from stack_helpers import bearer, inprocess_stack, wait_round


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with inprocess_stack(tmp_path_factory.mktemp("devft")) as s:  # tiny-bert, 4 blocks, split 1,3
        yield s


def test_devft_rounds_over_http_grow_the_submodel_stage_by_stage(stack) -> None:
    client, admin = stack.clients["cloud"], bearer(stack.admin)
    body = {"algorithm": "devft", "config": {"layers": [3, 4], "rounds": 1}, "local_steps": 2}
    views = []
    for _ in range(2):
        r = client.post("/v1/rounds", json=body, headers=admin)
        assert r.status_code == 202, r.text
        views.append(wait_round(stack, r.json()["round_id"]))
    assert [v["state"] for v in views] == ["committed", "committed"], views
    stage1, stage2 = (v["metrics"] for v in views)
    assert (stage1["devft"]["stage"], stage1["devft"]["layers"], stage2["devft"]["stage"]) == (1, 3, 2)
    assert stage1["devft"]["representatives"] == {"user": [0], "edge": [1], "cloud": [3]}
    assert stage1["blocks_per_step"] == {"user": 1.0, "edge": 1.0, "cloud": 1.0}
    assert stage2["blocks_per_step"] == {"user": 1.0, "edge": 2.0, "cloud": 1.0}
    for metrics in (stage1, stage2):
        assert all(metrics["compute_seconds"][t] > 0 for t in ("user", "edge", "cloud"))
        assert metrics["bytes"]["user_edge"]["up"] > 0 and metrics["bytes"]["edge_cloud"]["up"] > 0
        assert "eval_loss" in metrics
    shapes = []
    for view in views:
        r = client.get(f"/v1/adapters/{view['version']}", headers=admin)
        assert r.status_code == 200
        version = AdapterBundle.from_tensors(load(r.content))
        shapes.append({t.value: block_ids(version[t]) for t in (Tier.USER, Tier.EDGE, Tier.CLOUD)})
    assert shapes == [{"user": [0], "edge": [1], "cloud": [3]}, {"user": [0], "edge": [1, 2], "cloud": [3]}]
