"""What a user declares at registration, through the edge to the cloud over the apps' real HTTP code path: the
cut the cloud assigns (and the blocks the edge then holds), and the 4xx a declaration the cloud cannot serve gets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from stack_helpers import AUDIENCES, Stack, inprocess_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("registration")) as s:
        yield s


def register(stack: Stack, **declared: Any) -> httpx.Response:
    """user-1 (a credential no tier has registered) registers itself at the edge with ``declared``."""
    body = json.dumps({"user_id": "user-1", "url": "http://user.test", "num_samples": 4, **declared}).encode()
    headers = {"content-type": "application/json",
               **stack.credential("user-1").sign("POST", "/v1/users", AUDIENCES["edge"], body)}
    return stack.clients["edge"].post("/v1/users", content=body, headers=headers)


def test_a_budget_below_the_embeddings_is_refused_with_the_smallest_budget(stack: Stack) -> None:
    r = register(stack, memory_budget=1000)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "cannot hold the embeddings of tiny-bert" in detail and "the smallest budget is" in detail
    assert "user-1" not in stack.cloud.coordinator.edge_users["edge-0"]


@pytest.mark.parametrize("declared, named", [({"data": "imdb"}, "does not train task 'imdb'; it trains trec"),
                                             ({"model": "smollm2-135m"}, "this cloud serves tiny-bert (trec)"),
                                             ({"rank": 64}, "rank 64 is out of range")])
def test_an_unknown_model_or_task_is_refused_naming_what_the_cloud_serves(stack: Stack, declared: dict[str, Any],
                                                                          named: str) -> None:
    r = register(stack, **declared)
    assert r.status_code == 422, r.text
    assert named in r.json()["detail"]


def test_an_edge_naming_a_model_the_cloud_does_not_serve_is_refused(stack: Stack) -> None:
    body = json.dumps({"edge_id": "edge-0", "url": "http://edge.test", "model": "gpt-5"}).encode()
    headers = {"content-type": "application/json",
               **stack.credential("edge-0").sign("POST", "/v1/edges", AUDIENCES["cloud"], body)}
    r = stack.clients["cloud"].post("/v1/edges", content=body, headers=headers)
    assert r.status_code == 422 and "it serves tiny-bert (trec)" in r.json()["detail"], r.text


def test_a_declared_block_count_is_the_users_cut_and_the_edge_then_holds_its_blocks(stack: Stack) -> None:
    assert stack.edge.runtime.partition.layer_ids == [1, 2]  # user-0 at the deployment's cut a = 1
    r = register(stack, max_blocks=0, rank=2)
    assert r.status_code == 200, r.text
    assert r.json()["placement"] == {"data": "trec", "cut": 0, "rank": 2}
    assert stack.edge.runtime.partition.layer_ids == [0, 1, 2]
    placement = stack.cloud.coordinator.placements["user-1"]
    assert (placement.cut, placement.rank) == (0, 2)
    r = register(stack, max_blocks=9)  # bounded by b = 3
    assert r.status_code == 200 and r.json()["placement"]["cut"] == 3, r.text


def test_a_sample_count_past_what_an_edges_reports_can_carry_is_refused(stack: Stack) -> None:
    """num_samples had no upper bound: a user registered with 10**30 samples, and its edge's evaluation report (its
    users' sample counts summed) could then not be encoded, so the cloud heard nothing from that edge for any of its
    users until the deadline passed ("no edge reported")."""
    from shared.config.placement import MAX_NUM_SAMPLES

    r = register(stack, num_samples=10**30)
    assert r.status_code == 422 and "num_samples" in r.text, r.text
    assert stack.edge.user_samples.get("user-1", 0) < MAX_NUM_SAMPLES
    assert register(stack, num_samples=MAX_NUM_SAMPLES).status_code == 200
    assert register(stack).status_code == 200  # as the other tests have it


def test_a_field_the_edge_does_not_know_is_refused_naming_it(stack: Stack) -> None:
    before = dict(stack.cloud.coordinator.edge_users["edge-0"])
    r = register(stack, max_block=2)  # misspelt max_blocks: not silently left out
    assert r.status_code == 422 and "max_block" in r.text, r.text
    assert stack.cloud.coordinator.edge_users["edge-0"] == before
