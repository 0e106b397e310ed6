"""Round tickets (``shared.http.tickets``): a user takes a round's start only with the cloud's signed ticket for that
very start, so an edge, revoked or not, cannot start rounds the cloud did not order. The checks one by one on real
credentials; then the attacks through the in-process deployment's real HTTP code path (stack_helpers.py).
Between real processes: test_services.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from shared.errors import Forbidden
from shared.http.credentials import Credential, Verifier, issue, load_private_key, load_public_key
from shared.http.tickets import check_ticket, issue_ticket
from shared.lab.credentials import Provisioned, provision
from shared.protocol.enums import Mode, Tier
from shared.protocol.messages import RoundPlan
from shared.protocol.starts import UserStart
from stack_helpers import Stack, bearer, inprocess_stack, run_round


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    return provision(tmp_path_factory.mktemp("tickets"), ["edge-0", "edge-1"], {"user-0": 0})


def cred(creds: Provisioned, who: str) -> Credential:
    return Credential.load(creds.credentials[who])


def verifier(creds: Provisioned) -> Verifier:
    return Verifier(load_public_key(str(creds.trust_key)), creds.deployment)


PLAN = RoundPlan(round_id=4, user_id="user-0", local_steps=3, batch_size=8, lr=1e-3, cut=2)


def refusal(creds: Provisioned, ticket: Any, plan: RoundPlan = PLAN, edge: str = "edge-0") -> str:
    with pytest.raises(Forbidden) as caught:
        check_ticket(verifier(creds), ticket, plan, edge, "user-0")
    return caught.value.reason


def test_the_clouds_ticket_for_this_start_is_accepted(creds):
    check_ticket(verifier(creds), issue_ticket(cred(creds, "cloud"), PLAN, "edge-0"), PLAN, "edge-0", "user-0")
    plain = dataclasses.replace(PLAN, cut=None, data=None, mode=Mode.EVAL)  # unset placement: null in the claims
    check_ticket(verifier(creds), issue_ticket(cred(creds, "cloud"), plain, "edge-0"), plain, "edge-0", "user-0")


def test_a_missing_or_malformed_ticket_is_refused(creds):
    for ticket in (None, {}, "a string", {"certificate": "x"}, {"certificate": 1, "token": "y"}):
        assert "no ticket from the cloud" in refusal(creds, ticket), ticket
    good = issue_ticket(cred(creds, "cloud"), PLAN, "edge-0")
    assert "ticket" in refusal(creds, {**good, "certificate": "not.a.jwt"})
    assert "does not verify" in refusal(creds, {**good, "token": good["token"][:-4] + "AAAA"})


def test_only_the_clouds_own_credential_makes_a_ticket(creds, tmp_path):
    """An edge signs a ticket with its own key (it holds no other): refused; so is another deployment's cloud, and a
    ticket whose token the cloud's key did not sign under the cloud's certificate."""
    assert "may not be used here" in refusal(creds, issue_ticket(cred(creds, "edge-0"), PLAN, "edge-0"))
    other = provision(tmp_path / "other", [], {}, deployment="other")  # another deployment's key
    assert "invalid credential" in refusal(creds, issue_ticket(cred(other, "cloud"), PLAN, "edge-0"))
    key = load_private_key(creds.directory / "deployment.key")  # this key, another deployment's name
    assert "for deployment 'other'" in refusal(creds, issue_ticket(issue(key, "other", "cloud", "cloud", 60), PLAN, "edge-0"))
    edge_token = issue_ticket(cred(creds, "edge-0"), PLAN, "edge-0")["token"]
    forged = {"certificate": cred(creds, "cloud").certificate, "token": edge_token}
    assert "does not verify" in refusal(creds, forged)
    claims = jwt.decode(issue_ticket(cred(creds, "cloud"), PLAN, "edge-0")["token"], options={"verify_signature": False})
    untyped = jwt.encode(claims, cred(creds, "cloud").key, algorithm="EdDSA")  # the cloud's key, but no ticket's type
    assert "its type is not splitllm-ticket" in refusal(creds, {**forged, "token": untyped})


def test_a_ticket_made_for_another_start_is_refused(creds):
    cloud = cred(creds, "cloud")
    assert "for edge 'edge-0', not 'edge-1'" in refusal(creds, issue_ticket(cloud, PLAN, "edge-0"), edge="edge-1")
    other_user = dataclasses.replace(PLAN, user_id="user-1")
    assert "does not verify" in refusal(creds, issue_ticket(cloud, other_user, "edge-0"))  # its audience
    changes = {"round_id": 5, "mode": Mode.EVAL, "local_steps": 300, "batch_size": 64, "cut": 0, "data": "sms"}
    for name, value in changes.items():
        reason = refusal(creds, issue_ticket(cloud, PLAN, "edge-0"), dataclasses.replace(PLAN, **{name: value}))
        assert reason.endswith(f"what the cloud signed in: {name}"), (name, reason)
    unset = refusal(creds, issue_ticket(cloud, PLAN, "edge-0"), dataclasses.replace(PLAN, cut=None))
    assert unset.endswith("signed in: cut"), unset


def test_a_ticket_holds_from_its_signing_to_its_end_with_300_s_either_way(creds, monkeypatch):
    """A ticket is valid for its lifetime (at least 300 s), and the clocks may differ by 300 s either way: one signed
    700 s ago for 300 s, or 400 s ahead of this clock, is refused; one signed 700 s ago for the phase's hour is taken
    (an edge starting hundreds of users, some unreachable, reaches the last of them late)."""
    import shared.http.tickets as tickets

    now = tickets.time.time()

    def signed(at: float, lifetime: float = 0.0) -> dict[str, str]:
        monkeypatch.setattr(tickets.time, "time", lambda: now + at)
        ticket = issue_ticket(cred(creds, "cloud"), PLAN, "edge-0", lifetime)
        monkeypatch.setattr(tickets.time, "time", lambda: now)
        return ticket

    for at in (-700, 400):
        assert "is not valid now" in refusal(creds, signed(at)), at
    check_ticket(verifier(creds), signed(-700, 3600), PLAN, "edge-0", "user-0")
    check_ticket(verifier(creds), signed(-500), PLAN, "edge-0", "user-0")  # its 300 s, and the clocks' 300 s
    assert "is not valid now" in refusal(creds, signed(-3600 - 700, 3600))


def test_an_expired_cloud_certificate_makes_no_ticket(creds):
    expired = issue(load_private_key(creds.directory / "deployment.key"), creds.deployment, "cloud", "cloud", -10)
    assert "expired" in refusal(creds, issue_ticket(expired, PLAN, "edge-0"))


# -- through the deployment's HTTP code path --------------------------------------------------------------------------

@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with inprocess_stack(tmp_path) as s:
        yield s


def status(stack: Stack) -> dict[str, Any]:
    r = stack.clients["user"].get("/v1/status", headers=bearer(stack.admin))
    assert r.status_code == 200, r.text
    return r.json()


def test_a_revoked_edge_cannot_start_its_users(stack, monkeypatch):
    """The edge's credential is revoked at the cloud; the attacker holding the edge's server still signs starts as
    the user's own edge. With no ticket, with the last round's ticket on a new round, or with one it signed itself,
    the user refuses each (403) and says so in its status; it runs nothing. The cloud's own rounds run as before."""
    view = run_round(stack)
    assert view["state"] == "committed" and view["participants"] == ["user-0"], view
    last = view["round_id"]
    r = stack.clients["cloud"].post("/v1/credentials/revoke", json={"subject": "edge:edge-0"}, headers=bearer(stack.admin))
    assert r.status_code == 200, r.text
    jobs = dict(stack.user.jobs)
    adapters = stack.cloud.coordinator.global_state[Tier.USER]
    plan = stack.plan(last + 1)
    stale = stack.ticket(stack.plan(last))  # the cloud's ticket for the round before: valid, but for another round
    attempts = {
        "no ticket": (None, "no ticket from the cloud"),
        "the last round's ticket": (stale, "differs from what the cloud signed in: round_id"),
        "one the edge signed": (issue_ticket(stack.credential("edge-0"), plan, "edge-0"), "may not be used here"),
    }
    for name, (ticket, reason) in attempts.items():
        r = stack.post_msg("user", "start", UserStart(plan, adapters, ticket).to_message())
        assert r.status_code == 403 and reason in r.json()["detail"], (name, r.status_code, r.text)
        refused = status(stack)["refused_start"]
        assert refused["round"] == last + 1 and refused["edge"] == "edge-0" and reason in refused["reason"], refused
    assert dict(stack.user.jobs) == jobs, "a start without the cloud's ticket started the user"
    assert "splitllm_refused_starts_total 3" in stack.clients["user"].get("/metrics").text
    monkeypatch.setattr(stack.user, "_run", lambda start, key: None)  # the control starts no training
    r = stack.post_msg("user", "start", UserStart(plan, adapters, stack.ticket(plan)).to_message())
    assert r.status_code == 202, r.text  # the control: the cloud's ticket for this start is taken


@pytest.mark.parametrize("request_", [{}, {"local_steps": 2, "micro_batches": 2, "lr": 0.01, "evaluate": True,
                                          "algorithm": "droppeft", "config": {"ratio": 0.3, "skip": "independent"}}])
def test_the_clouds_rounds_carry_tickets_the_users_accept(stack, request_):
    """Plain rounds, and a round whose plans carry every field (an algorithm's config and per-user extras from its
    bandit, micro-batches, an evaluation phase): the user takes each start, as the cloud signed it."""
    view = run_round(stack, **request_)
    assert view["state"] == "committed" and view["metrics"]["dropped"] == [], view
    assert status(stack)["refused_start"] is None
    assert ("eval_loss" in view["metrics"]) is bool(request_), view["metrics"]


def start_as_edge(stack: Stack, plan: RoundPlan, ticket: Any) -> Any:
    """edge-0's signed start of ``plan`` at user-0 with ``ticket``."""
    return stack.post_msg("user", "start", UserStart(plan, stack.cloud.coordinator.global_state[Tier.USER],
                                                     ticket).to_message())


def test_the_clouds_ticket_for_another_user_of_the_edge_is_refused(stack, monkeypatch):
    """An edge holds the cloud's tickets for all its users. It sends user-0 the plan and ticket the cloud made for
    user-1, whose placement (here cut 0) differs: user-0 would run no block at all and hand the edge its embeddings.
    The ticket's audience is another user's: refused."""
    monkeypatch.setattr(stack.user, "_run", lambda start, key: None)
    jobs = dict(stack.user.jobs)
    plan = dataclasses.replace(stack.plan(40, user="user-1"), cut=0)
    r = start_as_edge(stack, plan, stack.ticket(plan))
    assert r.status_code == 403 and "user-1" in r.json()["detail"], r.text
    assert dict(stack.user.jobs) == jobs and status(stack)["refused_start"]["round"] == 40


# what an edge could change in a plan; the cloud's ticket binds every field (algorithm, config and extra decide the
# blocks a step runs: DropPEFT's ratio or DevFT's layers skip the device's blocks; the seed, the rows and masks drawn)
CHANGES = {"round_id": 41, "mode": Mode.EVAL, "local_steps": 300, "batch_size": 64, "cut": 0, "data": "sms",
           "lr": 1e-6, "seed": 99, "algorithm": "droppeft", "config": {"ratio": 0.9, "max_layer_ratio": 0.99},
           "extra": {"ratio": 100.0}, "rank": 1, "micro_batches": 2}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_start_whose_plan_differs_from_the_signed_one_in_any_field_is_refused(stack, monkeypatch, field):
    monkeypatch.setattr(stack.user, "_run", lambda start, key: None)
    signed = stack.plan(40)
    r = start_as_edge(stack, dataclasses.replace(signed, **{field: CHANGES[field]}), stack.ticket(signed))
    assert r.status_code == 403 and "differs from what the cloud signed" in r.json()["detail"], (field, r.text)
    assert stack.user.jobs == {}, stack.user.jobs  # a fresh stack's user: nothing started


@pytest.mark.parametrize(("signed", "sent"), [({"config": {"a": True}}, {"config": {"a": 1}}),
                                              ({"config": {"a": [1]}}, {"config": {"a": [1.0]}}),
                                              ({"extra": {"a": {"b": False}}}, {"extra": {"a": {"b": 0}}})])
def test_a_plans_maps_must_match_with_their_json_types(stack, monkeypatch, signed, sent):
    """The signed plan says true, an integer or false where the start has 1, a float or 0 (equal in Python): refused."""
    monkeypatch.setattr(stack.user, "_run", lambda start, key: None)
    plan = dataclasses.replace(stack.plan(40), **signed)
    r = start_as_edge(stack, dataclasses.replace(plan, **sent), stack.ticket(plan))
    assert r.status_code == 403 and "differs from what the cloud signed" in r.json()["detail"], (sent, r.text)


def cloud_signed(stack: Stack, start: RoundPlan, claims: dict[str, Any]) -> dict[str, str]:
    """The cloud's ticket for ``start`` with ``claims`` changed, signed by the cloud's key (as a faulty cloud would)."""
    ticket = stack.ticket(start)
    payload = {**jwt.decode(ticket["token"], options={"verify_signature": False}), **claims}
    token = jwt.encode(payload, stack.credential("cloud").key, algorithm="EdDSA", headers={"typ": "splitllm-ticket"})
    return {**ticket, "token": token}


def test_odd_claims_even_under_the_clouds_key_get_a_403_not_a_500(stack, monkeypatch):
    """Only the cloud's key signs claims, but a user answers odd ones with a reason, never an internal error: an
    `iat` past a float's range, an audience that lists this user among others (the README: one string), no plan or
    one that is not a plan."""
    monkeypatch.setattr(stack.user, "_run", lambda start, key: None)
    plan = stack.plan(40)
    for claims in ({"iat": 10**400}, {"iat": "now"}, {"exp": 10**400}, {"exp": float("nan")}, {"exp": None},
                   {"aud": ["user:user-0", "user:user-1"]}, {"plan": None},
                   {"plan": {**plan.to_meta(), "seed": True}}):
        r = start_as_edge(stack, plan, cloud_signed(stack, plan, claims))
        assert r.status_code == 403, (claims, r.status_code, r.text)
