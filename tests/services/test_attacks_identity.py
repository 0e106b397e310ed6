"""The issue's attacks on identities, replayed against the in-process deployment (stack_helpers.py: real apps,
their real HTTP code path), each shown to fail with the victim unaffected: identity takeover (re-registering
someone else's user or edge id, or forging a user's registration at the cloud), server-side request forgery
through callback URLs, and a signed request one tier received used at another.

Sessions and revocation: test_attacks_sessions.py; takeover between real processes: test_services.py.
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any, Iterator

import httpx
import pytest

from shared.http.credentials import Credential
from stack_helpers import AUDIENCES, Stack, bearer, inprocess_stack, run_round

ATTACKER = "http://attacker.test:8200"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("attacks-identity")) as s:
        yield s


def signed_json(credential: Credential, path: str, payload: Any, audience: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    return body, {"content-type": "application/json", **credential.sign("POST", path, audience, body)}


def post(stack: Stack, tier: str, path: str, payload: Any, who: str | Credential,
         audience: str | None = None) -> httpx.Response:
    """POST JSON to ``tier``, signed by the stack's credential ``who`` (or a credential) for the tier."""
    credential = stack.credential(who) if isinstance(who, str) else who
    body, headers = signed_json(credential, path, payload, audience or AUDIENCES[tier])
    return stack.clients[tier].post(path, content=body, headers=headers)


def samples(stack: Stack) -> int:
    return stack.cloud.coordinator.edge_users["edge-0"]["user-0"]


def reregister_user(stack: Stack) -> httpx.Response:
    """user-0 registers again, itself, at its real address; the edge's new link is pointed at its app."""
    r = post(stack, "edge", "/v1/users", {"user_id": "user-0", "url": "http://user.test",
                                          "num_samples": samples(stack)}, "user-0")
    link = stack.edge.users["user-0"]
    link.client = stack.link_client("user", link.auth)
    return r


def reregister_edge(stack: Stack) -> httpx.Response:
    """edge-0 registers again, itself, at its real address; the cloud's new link is pointed at its app."""
    r = post(stack, "cloud", "/v1/edges", {"edge_id": "edge-0", "url": "http://edge.test"}, "edge-0")
    link = stack.cloud.coordinator.edges["edge-0"]
    link.client = stack.link_client("edge", link.auth)
    return r


def assert_trains(stack: Stack) -> None:
    view = run_round(stack)
    assert view["state"] == "committed" and view["metrics"]["dropped"] == [], view
    assert view["participants"] == ["user-0"], view


# -- identity takeover ----------------------------------------------------------------------------------------------

def test_identity_takeover_needs_the_victims_own_credential(stack):
    coordinator, edge = stack.cloud.coordinator, stack.edge
    user_link, edge_link = edge.users["user-0"], coordinator.edges["edge-0"]
    registered = {e: dict(u) for e, u in coordinator.edge_users.items()}
    # user-1 re-registers user-0 at the attacker's address: 403, nothing replaced
    r = post(stack, "edge", "/v1/users", {"user_id": "user-0", "url": ATTACKER, "num_samples": 10**9}, "user-1")
    assert r.status_code == 403 and "may not act as user 'user-0'" in r.json()["detail"], r.text
    # an edge registers as another edge id, or another edge as edge-0: 403
    r = post(stack, "cloud", "/v1/edges", {"edge_id": "edge-1", "url": ATTACKER}, "edge-0")
    assert r.status_code == 403 and "may not act as edge 'edge-1'" in r.json()["detail"], r.text
    r = post(stack, "cloud", "/v1/edges", {"edge_id": "edge-0", "url": ATTACKER}, stack.issue("edge", "edge-9"))
    assert r.status_code == 403 and "may not act as edge 'edge-0'" in r.json()["detail"], r.text
    assert edge.users["user-0"] is user_link and coordinator.edges["edge-0"] is edge_link
    assert set(coordinator.edges) == {"edge-0"} and coordinator.edge_users == registered
    # user-0 itself may register again (a restarted device)
    r = reregister_user(stack)
    assert r.status_code == 200 and r.json()["edge_id"] == "edge-0", r.text
    assert edge.users["user-0"] is not user_link and coordinator.edge_users == registered
    assert_trains(stack)


def registration(stack: Stack, who: str | Credential, payload: dict[str, Any], audience: str) -> dict[str, Any]:
    """A user's signed registration request to an edge, as the edge forwards it to the cloud."""
    credential = stack.credential(who) if isinstance(who, str) else who
    body, headers = signed_json(credential, "/v1/users", payload, audience)
    return {"headers": {k: v for k, v in headers.items() if k.startswith("x-splitllm-")},
            "body": base64.b64encode(body).decode()}


def test_identity_takeover_the_cloud_wants_the_users_own_signed_registration(stack):
    """An edge (its own credential) telling the cloud of a user: only with that user's signed request to it."""
    coordinator = stack.cloud.coordinator
    registered = {e: dict(u) for e, u in coordinator.edge_users.items()}
    own = {"user_id": "user-1", "url": ATTACKER, "num_samples": 5}
    # user-0's real registration as the edge forwarded it: replayed by a compromised edge
    captured: list[dict[str, Any]] = []
    real_forward = stack.cloud.register_user
    stack.cloud.register_user = lambda edge_id, body, caller: captured.append(body.registration.model_dump()) \
        or real_forward(edge_id, body, caller)
    try:
        assert reregister_user(stack).status_code == 200
    finally:
        stack.cloud.register_user = real_forward
    deep = base64.b64encode(b"[" * 5000).decode()  # json.loads raises RecursionError, not ValueError
    forged = {
        "without the user's request": ({"user_id": "user-1", "num_samples": 5}, "needs its signed request"),
        "the user's request to another edge": (
            {"user_id": "user-1", "num_samples": 5, "registration": registration(stack, "user-1", own, "edge:edge-9")},
            "signed for 'edge:edge-9'"),
        "altered num_samples": (
            {"user_id": "user-1", "num_samples": 10**9, "registration": registration(stack, "user-1", own,
                                                                                     "edge:edge-0")},
            "another user id or sample count"),
        "another user's request": (
            {"user_id": "user-0", "num_samples": 5, "registration": registration(stack, "user-1", own,
                                                                                 "edge:edge-0")},
            "another user id or sample count"),
        "a registration the cloud already took": (
            {"user_id": "user-0", "num_samples": samples(stack), "registration": captured[0]}, "replayed"),
        "the user's request with another body (a compromised edge's)": (
            {"user_id": "user-1", "num_samples": 5,
             "registration": {**registration(stack, "user-1", own, "edge:edge-0"), "body": deep}},
            "not the body the user signed"),
        "a signed body nested too deep to parse": (
            {"user_id": "user-1", "num_samples": 5, "registration": {
                "headers": stack.signed("user-1", "POST", "/v1/users", b"[" * 5000, tier="edge"), "body": deep}},
            "not a JSON object"),
        "an expired user credential": (
            {"user_id": "user-1", "num_samples": 5,
             "registration": registration(stack, stack.issue("user", "user-1", ttl=-60), own, "edge:edge-0")},
            "expired"),
    }
    for name, (payload, reason) in forged.items():
        r = post(stack, "cloud", "/v1/edges/edge-0/users", payload, "edge-0")
        assert r.status_code == 422 and reason in r.json()["detail"], (name, r.status_code, r.text)
    r = post(stack, "cloud", "/v1/edges/edge-9/users", forged["altered num_samples"][0], "edge-0")
    assert r.status_code == 403, r.text  # an edge speaks for its own users only
    assert coordinator.edge_users == registered


# -- server-side request forgery -------------------------------------------------------------------------------------

METADATA_URLS = ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:8200", "http://169.254.170.2/v2/creds",
                 "http://metadata.google.internal/computeMetadata/v1/", "http://METADATA.Google.Internal/",
                 "http://[fd00:ec2::254]/", "http://100.100.100.200/", "http://0.0.0.0:8200", "http://[ff02::1]:8200",
                 "http://[::ffff:169.254.169.254]/")


def test_ssrf_callback_urls_at_link_local_or_metadata_addresses_are_refused(stack):
    coordinator, edge = stack.cloud.coordinator, stack.edge
    user_link, edge_link = edge.users["user-0"], coordinator.edges["edge-0"]
    for url in METADATA_URLS:
        r = post(stack, "edge", "/v1/users", {"user_id": "user-0", "url": url, "num_samples": samples(stack)},
                 "user-0")
        assert r.status_code == 422 and "callback URL refused" in r.json()["detail"], (url, r.text)
        r = post(stack, "cloud", "/v1/edges", {"edge_id": "edge-0", "url": url}, "edge-0")
        assert r.status_code == 422 and "callback URL refused" in r.json()["detail"], (url, r.text)
    assert edge.users["user-0"] is user_link and coordinator.edges["edge-0"] is edge_link
    # an allowed address works: each tier registers again at its own
    assert reregister_edge(stack).status_code == 200
    assert reregister_user(stack).status_code == 200
    assert_trains(stack)


# Other spellings of 169.254.169.254 that the C library's resolver (inet_aton) takes, and the metadata host name
# as a fully qualified name: httpx connects to them as it would to the plain address.
ALTERNATE_METADATA_URLS = ("http://2852039166/", "http://0xa9fea9fe/", "http://169.254.43518/",
                           "http://0xa9.0xfe.0xa9.0xfe/", "http://0251.0376.0251.0376/",
                           "http://metadata.google.internal./")


def test_ssrf_alternate_spellings_of_the_metadata_address_are_refused(stack):
    accepted = []
    try:
        for url in ALTERNATE_METADATA_URLS:
            host = url.split("/")[2]
            if not host.endswith("."):
                assert socket.inet_aton(host) == bytes([169, 254, 169, 254]), host  # it is the metadata address
            r = post(stack, "edge", "/v1/users", {"user_id": "user-0", "url": url, "num_samples": samples(stack)},
                     "user-0")
            if r.status_code != 422:
                accepted.append(("edge", url, r.status_code, r.text[:200]))
            r = post(stack, "cloud", "/v1/edges", {"edge_id": "edge-0", "url": url}, "edge-0")
            if r.status_code != 422:
                accepted.append(("cloud", url, r.status_code, r.text[:200]))
    finally:
        reregister_edge(stack)
        reregister_user(stack)
    assert not accepted, "\n".join(map(str, accepted))


# -- a signed request used where it was not sent ---------------------------------------------------------------------

def capture(client: httpx.Client, path: str) -> list[tuple[dict[str, str], bytes]]:
    """The signature headers and body of each request ``client`` sends to ``path`` (after it signed them)."""
    seen: list[tuple[dict[str, str], bytes]] = []

    def hook(request: httpx.Request) -> None:
        if request.url.path == path:
            seen.append(({k: v for k, v in request.headers.items() if k.startswith("x-splitllm-")}, request.content))

    client.event_hooks["request"].append(hook)
    return seen


def test_a_stolen_edge_to_user_request_cannot_be_used_elsewhere(stack):
    """The user receives the edge's signed start (and the edge the user's signed steps): a thief of either can use
    it nowhere else: not at the cloud, not at another tier, not again where it was sent."""
    starts = capture(stack.edge.users["user-0"].client, "/v1/start")
    steps = capture(stack.user.edge.client, "/v1/step")
    view = run_round(stack)
    assert view["state"] == "committed" and starts and steps, (view, len(starts), len(steps))
    jobs = dict(stack.user.jobs)
    (start_headers, start), (step_headers, step) = starts[-1], steps[-1]
    msgpack = {"content-type": "application/x-msgpack"}
    attempts = {
        "the start at the edge's /v1/start": ("edge", "/v1/start", start_headers, start, "signed for 'user:user-0'"),
        "the start at the cloud's /v1/step": ("cloud", "/v1/step", start_headers, start, "does not verify"),
        "the start at the cloud's /v1/update": ("cloud", "/v1/update", start_headers, start, "does not verify"),
        "the start again at the user": ("user", "/v1/start", start_headers, start, "replayed"),
        "a step at the cloud's /v1/step": ("cloud", "/v1/step", step_headers, step, "signed for 'edge:edge-0'"),
        "a step again at the edge": ("edge", "/v1/step", step_headers, step, "replayed"),
    }
    for name, (tier, path, headers, body, reason) in attempts.items():
        r = stack.clients[tier].post(path, content=body, headers={**msgpack, **headers})
        assert r.status_code == 401 and reason in r.json()["detail"], (name, r.status_code, r.text)
    certificate = start_headers["x-splitllm-certificate"]  # the edge's certificate, as a bearer: not an admin's
    r = stack.clients["cloud"].post("/v1/rounds", json={}, headers=bearer(certificate))
    assert r.status_code == 401 and "may not be used here" in r.json()["detail"], r.text
    assert dict(stack.user.jobs) == jobs, "a replayed start started the user again"
    assert_trains(stack)
