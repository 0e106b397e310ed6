"""The services' ``block_copies`` setting: the edge and the cloud hold that many copies of their blocks and run rounds
on them through their real HTTP routes (in-process apps), a plug-in's base weight overrides (DevFT's fused layers)
and a held-out evaluation included."""

from __future__ import annotations

import pytest
from stack_helpers import bearer, inprocess_stack, wait_round

from shared.runtime.copies import auto_copies


@pytest.mark.parametrize("copies", [2, 0])
def test_edge_and_cloud_train_and_evaluate_on_their_copies(tmp_path, copies: int) -> None:
    with inprocess_stack(tmp_path, edge={"block_copies": copies}, block_copies=copies) as stack:
        expected = copies or auto_copies("cpu", 0)
        assert stack.cloud.runtime.copies.count == stack.edge.runtime.copies.count == expected
        client, admin = stack.clients["cloud"], bearer(stack.admin)
        for body in ({"local_steps": 2, "evaluate": True},
                     {"algorithm": "devft", "config": {"layers": [3, 4], "rounds": 1}, "local_steps": 2}):
            r = client.post("/v1/rounds", json=body, headers=admin)
            assert r.status_code == 202, r.text
            view = wait_round(stack, r.json()["round_id"])
            assert view["state"] == "committed", view
        assert stack.cloud.runtime.copies.idle() == expected and stack.edge.runtime.copies.idle() == expected
