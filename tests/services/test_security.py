"""Security of the three tiers' HTTP surface: per-identity credentials on every /v1 route, the admin-only round
API, no pickle anywhere (start-up checks: test_startup_checks.py; the issue's attacks: test_attacks_*.py;
hostile tensors and updates: test_hostile_input.py).

The tests drive the real FastAPI apps in-process (``inprocess_stack`` of stack_helpers.py): one cloud, one edge
and one user, each behind a ``TestClient``, registered with each other through their own HTTP routes.
"""

from __future__ import annotations

import hashlib
import pickle
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import msgpack
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import cloud_server.app as cloud_app
import edge_server.app as edge_app
from shared.http.credentials import (CERT_HEADER, MAX_SKEW, SIGNATURE_HEADER, SIGNED_HEADER, Credential, b64url,
                                     signing_input)
from shared.lab.credentials import provision
from shared.protocol.wire import CONTENT_TYPE, Message, encode
from stack_helpers import (AUDIENCES, HOLDERS, TIERS, Stack, bearer, inprocess_stack, route_caller, route_roles,
                           wait_round)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("security")) as s:
        yield s


# -- routes and their legitimate callers ----------------------------------------------------------------------

PATH_VALUES = {"round_id": "1", "version": "0", "edge_id": "edge-0", "user_id": "user-0"}
OPEN_PATHS = ("/healthz", "/metrics", "/docs", "/openapi.json")
OUTSIDER = {"cloud": "edge-0", "edge": "user-0", "user": "edge-0"}  # who signs where only an admin may call
WRONG_ROLE = {"cloud": "user-0", "edge": "edge-0", "user": "user-1"}  # a valid credential no route of the tier takes


def v1_routes(app: Any) -> list[tuple[str, str, str]]:
    """(method, concrete path, the body it reads: json, msgpack or none) of every /v1 route of an app."""
    out = []
    for r in app.routes:
        if isinstance(r, APIRoute) and r.path.startswith("/v1"):
            path = r.path
            for name, value in PATH_VALUES.items():
                path = path.replace("{" + name + "}", value)
            assert "{" not in path, f"no test value for a path parameter of {r.path}"
            for method in sorted(r.methods):
                kind = "json" if r.body_field is not None else "msgpack" if "x-msgpack" in (r.summary or "") else "none"
                out.append((method, path, kind))
    return out


def as_caller(stack: Stack, tier: str, method: str, path: str, body: bytes) -> dict[str, str]:
    """The headers the route's legitimate caller sends with ``body``."""
    who = route_caller(tier, method, path)
    return bearer(stack.admin) if who is None else stack.signed(who, method, path, body, tier=tier)


def sign_at(credential: Credential, method: str, path: str, audience: str, body: bytes,
            ts: float | str) -> dict[str, str]:
    """A request signed as ``Credential.sign`` does, but at another time ``ts`` (a str: signed as it is)."""
    params = f"ts={ts if isinstance(ts, str) else int(ts)};nonce={b64url(secrets.token_bytes(16))};aud={audience};" \
             f"digest={hashlib.sha256(body).hexdigest()}"
    assert credential.key is not None
    return {CERT_HEADER: credential.certificate, SIGNED_HEADER: params,
            SIGNATURE_HEADER: b64url(credential.key.sign(signing_input(method, path, params)))}


def test_every_tier_exposes_the_expected_v1_routes(stack):
    routes = {t: {(m, p) for m, p, _ in v1_routes(stack.apps[t])} for t in TIERS}
    assert ("POST", "/v1/rounds") in routes["cloud"] and ("POST", "/v1/rounds/1/cancel") in routes["cloud"]
    assert ("POST", "/v1/credentials/revoke") in routes["cloud"]
    assert {("POST", "/v1/step"), ("POST", "/v1/start"), ("POST", "/v1/update")} <= routes["edge"]
    assert ("POST", "/v1/start") in routes["user"]
    assert sum(len(r) for r in routes.values()) >= 19, routes
    for tier, found in routes.items():  # every route has its rule: none is left open by mistake
        assert all(route_roles(tier, m, p) for m, p in found), tier


# -- credentials: every way a request can fail to be its caller's ----------------------------------------------

@pytest.fixture(scope="module")
def foreign(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Credential]]:
    """Credentials of the tiers' holders that must not pass: another deployment's key, another deployment's
    name, expired, revoked (their jti revoked at the cloud through its API, and told to the edge)."""
    other = provision(tmp_path_factory.mktemp("other-deployment"), ["edge-0"], {"user-0": 0, "user-1": 1})
    out: dict[str, dict[str, Credential]] = {"other key": {}, "other deployment": {}, "expired": {}, "revoked": {}}
    for who in set(HOLDERS.values()) | set(OUTSIDER.values()) | set(WRONG_ROLE.values()):
        role = "cloud" if who == "cloud" else who.split("-")[0]
        out["other key"][who] = Credential.load(other.credentials[who])
        out["other deployment"][who] = stack.issue(role, who, deployment="another-deployment")
        out["expired"][who] = stack.issue(role, who, ttl=-120)
        out["revoked"][who] = revoked = stack.issue(role, who)
        r = stack.clients["cloud"].post("/v1/credentials/revoke", json={"jti": revoked.principal().jti},
                                        headers=bearer(stack.admin))
        assert r.status_code == 200, r.text
    stack.services["edge"].revocations.merge(stack.cloud.revocations.to_meta())  # as a round's start tells it
    return out


def wrong_credentials(stack: Stack, foreign: dict[str, dict[str, Credential]], tier: str, method: str,
                      path: str, kind: str) -> dict[str, tuple[Callable[[bytes], httpx.Response], int, str]]:
    """name -> (send a body that way, the status expected, a word of the reason)."""
    client = stack.clients[tier]
    audience = AUDIENCES[tier]
    who = route_caller(tier, method, path) or OUTSIDER[tier]
    own = stack.credential(who)
    ctype = {"content-type": CONTENT_TYPE if kind == "msgpack" else "application/json"}

    def send(headers: dict[str, Any], body: bytes) -> httpx.Response:
        return client.request(method, path, content=body, headers={**ctype, **headers})

    def signed_by(cred: Credential, aud: str = audience, at: float | str | None = None,
                  signed_path: str = path) -> Callable[[bytes], httpx.Response]:
        return lambda body: send(sign_at(cred, method, signed_path, aud, body, time.time() if at is None else at), body)

    def replayed(body: bytes) -> httpx.Response:
        headers = own.sign(method, path, audience, body)
        send(headers, body)  # the original: answered whatever it deserves
        return send(headers, body)

    def tampered(body: bytes) -> httpx.Response:
        return send(own.sign(method, path, audience, body + b"x"), body)

    def other_key_signature(body: bytes) -> httpx.Response:
        headers = own.sign(method, path, audience, body)
        headers[SIGNATURE_HEADER] = stack.credential("user-1").sign(method, path, audience, body)[SIGNATURE_HEADER]
        return send(headers, body)

    roles = route_roles(tier, method, path)
    missing = "Authorization: Bearer" if "admin" in roles else "missing request signature"  # whom the route takes
    cases = {
        "no credential": (lambda body: send({}, body), 401, missing),
        "empty bearer": (lambda body: send({"authorization": "Bearer "}, body), 401, missing),
        "basic scheme": (lambda body: send({"authorization": f"Basic {stack.admin}"}, body), 401, "missing"),
        "random bearer": (lambda body: send(bearer(secrets.token_urlsafe(32)), body), 401, "invalid credential"),
        "non-ascii bearer": (lambda body: send({"authorization": b"Bearer \xff\xfe"}, body), 401, "invalid credential"),
        "tier credential as bearer": (lambda body: send(bearer(own.certificate), body), 401, "may not be used here"),
        "certificate from another deployment key": (signed_by(foreign["other key"][who]), 401, "invalid credential"),
        "another deployment's name": (signed_by(foreign["other deployment"][who]), 401, "another-deployment"),
        "expired credential": (signed_by(foreign["expired"][who]), 401, "expired"),
        "signed for another audience": (signed_by(own, aud="user:user-1" if tier != "user" else "cloud"), 401,
                                        "signed for"),
        "signed for another path": (signed_by(own, signed_path="/v1/elsewhere"), 401, "does not verify"),
        "signature by another key": (other_key_signature, 401, "does not verify"),
        "stale timestamp": (signed_by(own, at=time.time() - 2 * MAX_SKEW), 401, "more than"),
        "timestamp from the future": (signed_by(own, at=time.time() + 2 * MAX_SKEW), 401, "more than"),
        "timestamp NaN (fresh for ever)": (signed_by(own, at="nan"), 401, "not a number of seconds"),
        "replayed nonce": (replayed, 401, "replayed"),
        "role the route refuses": (signed_by(stack.credential(WRONG_ROLE[tier])), 403, "may not call"),
    }
    if route_caller(tier, method, path) is not None:  # (a request refused for its role never has its body read)
        cases["tampered body"] = (tampered, 401, "signature covers" if method == "POST" else "digest does not match")
    if tier != "user":  # edges learn revocations from the cloud (with each start); the model tells users of none
        cases["revoked credential"] = (signed_by(foreign["revoked"][who]), 401, "revoked")
    if tier == "edge" and path != "/v1/spec":  # a user signs the bare name for its first spec only, not the edge's id
        cases["signed for the bare 'edge'"] = (signed_by(own, aud="edge"), 401, "signed for")
    if "admin" not in route_roles(tier, method, path):
        cases["admin bearer on a tier route"] = (lambda body: send(bearer(stack.admin), body), 403, "may not call")
    return cases


@pytest.mark.parametrize("tier", TIERS)
def test_v1_routes_refuse_requests_that_are_not_their_callers_with_401_or_403(stack, foreign, tier):
    """Refused before the body is parsed: the bodies sent are malformed JSON and msgpack (a 400/422 if parsed)."""
    bad = []
    for method, path, kind in v1_routes(stack.apps[tier]):
        body = b"" if method == "GET" else b"\xc1 not msgpack" if kind == "msgpack" else b"{not json"
        for name, (attempt, status, reason) in wrong_credentials(stack, foreign, tier, method, path, kind).items():
            r = attempt(body)
            detail = r.json().get("detail")
            if r.status_code != status or not isinstance(detail, str) or reason not in detail:
                bad.append((method, path, name, r.status_code, r.text[:200]))
    assert not bad, "\n".join(map(str, bad))


@pytest.mark.parametrize("tier", TIERS)
def test_every_401_says_how_to_authenticate(stack, foreign, tier):
    """RFC 9110: a 401 carries WWW-Authenticate, whichever check refused the request."""
    missing = []
    for method, path, kind in v1_routes(stack.apps[tier]):
        body = b"" if method == "GET" else b"\x80" if kind == "msgpack" else b"{}"
        for name, (attempt, _, _) in wrong_credentials(stack, foreign, tier, method, path, kind).items():
            r = attempt(body)
            if r.status_code == 401 and r.headers.get("www-authenticate") != "SplitLLM":
                missing.append((method, path, name, r.headers.get("www-authenticate")))
    assert not missing, "\n".join(map(str, missing))


def test_unauthenticated_requests_are_refused_before_their_body_is_parsed(stack):
    for tier, path in (("cloud", "/v1/edges"), ("cloud", "/v1/rounds"), ("edge", "/v1/users")):
        r = stack.clients[tier].post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401, (tier, path, r.status_code, r.text)


def test_the_round_api_and_its_reads_need_the_admin_credential(stack):
    client, admin = stack.clients["cloud"], bearer(stack.admin)
    rounds_before = len(client.get("/v1/rounds", headers=admin).json()["rounds"])
    admin_only = (("POST", "/v1/rounds"), ("POST", "/v1/rounds/1/cancel"), ("GET", "/v1/rounds"),
                  ("GET", "/v1/rounds/1"), ("GET", "/v1/adapters/0"), ("GET", "/v1/credentials/revoked"),
                  ("POST", "/v1/credentials/revoke"))
    for method, path in admin_only:  # a tier's own, valid credential: 403
        body = b'{"evaluate": false}' if method == "POST" else b""
        r = client.request(method, path, content=body, headers={"content-type": "application/json",
                                                                **stack.signed("edge-0", method, path, body)})
        assert r.status_code == 403 and "may not call" in r.json()["detail"], (method, path, r.text)
    assert len(client.get("/v1/rounds", headers=admin).json()["rounds"]) == rounds_before, \
        "a refused start must not create a round"
    r = client.post("/v1/rounds", json={"local_steps": 1, "evaluate": False}, headers=admin)
    assert r.status_code == 202, r.text
    rid = r.json()["round_id"]
    r = client.post(f"/v1/rounds/{rid}/cancel", headers=admin)
    assert r.status_code == 200, r.text
    assert wait_round(stack, rid)["state"] in ("cancelled", "committed")
    assert client.post("/v1/rounds/999/cancel", headers=admin).status_code == 404
    for path in ("/v1/rounds", f"/v1/rounds/{rid}", "/v1/spec", "/v1/adapters/0", "/v1/credentials/revoked"):
        assert client.get(path, headers=admin).status_code == 200, path
    # the edge reads the spec with its own credential; the bearer scheme is case-insensitive
    assert client.get("/v1/spec", headers=stack.signed("edge-0", "GET", "/v1/spec")).status_code == 200
    assert client.get("/v1/rounds", headers={"authorization": f"bearer {stack.admin}"}).status_code == 200


def test_an_edge_tells_a_user_or_an_admin_whether_the_user_is_registered_there(stack):
    client, path = stack.clients["edge"], "/v1/users/user-0"
    assert client.get("/v1/spec", headers=stack.signed("user-1", "GET", "/v1/spec", audience="edge")).status_code == 200
    assert client.get(path, headers=bearer(stack.admin)).json() == {"user_id": "user-0", "registered": True}
    assert client.get(path, headers=stack.signed("user-0", "GET", path, tier="edge")).status_code == 200
    r = client.get(path, headers=stack.signed("user-1", "GET", path, tier="edge"))  # another user: not its to ask
    assert r.status_code == 403, r.text
    other = "/v1/users/user-1"
    assert client.get(other, headers=bearer(stack.admin)).status_code == 404


@pytest.mark.parametrize("tier", TIERS)
def test_health_metrics_and_docs_are_open(stack, tier):
    for path in OPEN_PATHS:
        r = stack.clients[tier].get(path)
        assert r.status_code == 200, (tier, path, r.text[:200])
    metrics = stack.clients[tier].get("/metrics").text
    assert "process_resident_memory_bytes" in metrics
    secrets_held = [stack.admin] + [stack.credential(w).certificate for w in ("cloud", "edge-0", "user-0")]
    assert not any(s in metrics for s in secrets_held)


# -- no pickle --------------------------------------------------------------------------------------------

class _Marker:
    """Unpickling this creates ``path`` (opening a file for writing is enough to prove code ran)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def refused_as_caller(r: httpx.Response) -> bool:
    """Refused for its credential or role (so the body never reached the handler: the test would prove nothing)."""
    return r.status_code == 401 or r.status_code == 403 and "may not call" in r.json()["detail"]


PICKLE_TYPES = ("application/x-msgpack", "application/octet-stream", "application/python-pickle")


@pytest.mark.parametrize("tier", TIERS)
def test_no_endpoint_unpickles(stack, tier, tmp_path):
    """Each body signed by the route's legitimate caller, so that it reaches the handler."""
    marker = tmp_path / f"pwned-{tier}"
    payload = pickle.dumps(_Marker(marker))
    msgpack_wrapped = [
        msgpack.packb({"v": 1, "kind": "step", "meta": {}, "tensors": {}, "x": msgpack.ExtType(1, payload)}),
        msgpack.packb({"v": 1, "kind": "step", "meta": {"x": msgpack.ExtType(1, payload)}, "tensors": {}}),
        msgpack.packb(msgpack.ExtType(1, payload)),
        encode(Message("step", {"round": 1, "user": "user-0", "step": 0, "mode": "train", "blob": payload})),
    ]
    posts = [p for m, p, kind in v1_routes(stack.apps[tier]) if m == "POST" and kind != "none"]  # those read a body
    assert posts
    client = stack.clients[tier]
    for path in posts:
        sent = [(pickle.dumps(_Marker(marker), protocol=protocol), ctype)
                for ctype in PICKLE_TYPES for protocol in (0, 2, pickle.HIGHEST_PROTOCOL)]
        sent += [(body, CONTENT_TYPE) for body in msgpack_wrapped]
        for body, ctype in sent:
            r = client.post(path, content=body, headers={**as_caller(stack, tier, "POST", path, body),
                                                         "content-type": ctype})
            assert 400 <= r.status_code < 500 and not refused_as_caller(r), (tier, path, ctype, r.status_code,
                                                                            r.text[:200])
    time.sleep(0.2)  # anything a handler started in the background has had its chance
    assert not marker.exists(), f"{tier} unpickled a request body"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("tier", ["cloud", "edge"])
def test_json_routes_answer_non_utf8_bodies_with_4xx(stack, tier):
    bad = []
    body = b"\x80\x04\x95"
    for method, path, kind in v1_routes(stack.apps[tier]):
        if method == "POST" and kind == "json":
            for ctype in ("application/x-msgpack", "application/octet-stream"):
                r = stack.clients[tier].post(path, content=body, headers={
                    **as_caller(stack, tier, method, path, body), "content-type": ctype})
                if not 400 <= r.status_code < 500 or refused_as_caller(r):
                    bad.append((path, ctype, r.status_code, r.text[:200]))
    assert not bad, bad


def test_json_routes_refuse_other_content_types_before_reading_the_body(stack):
    """The 1 MiB JSON cap is the guard's for any body not sent as msgpack; a JSON route sent a msgpack body would
    otherwise read it whole (FastAPI reads a non-JSON body into memory, then fails validation): 415 instead."""
    big = b" " * (2 << 20)
    bad = []
    for tier in ("cloud", "edge"):
        for method, path, kind in v1_routes(stack.apps[tier]):
            if method == "POST" and kind == "json":
                for ctype in (CONTENT_TYPE, "Application/X-Msgpack; charset=utf-8"):
                    r = stack.clients[tier].post(path, content=big, headers={
                        **as_caller(stack, tier, method, path, big), "content-type": ctype})
                    if r.status_code != 415 or "application/json" not in r.json()["detail"]:
                        bad.append((tier, path, ctype, r.status_code, r.text[:200]))
    assert not bad, bad
    r = stack.clients["cloud"].post("/v1/rounds", content=b'{"nope": 1}',  # a JSON type with parameters is JSON
                                    headers={**bearer(stack.admin), "content-type": "application/json; charset=utf-8"})
    assert r.status_code == 422, r.text


def test_insecure_dev_really_skips_the_credential_check():
    from shared.config.settings import EdgeSettings

    app = edge_app.create_app(EdgeSettings(cloud="http://127.0.0.1:9", insecure_dev=True))
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: the edge is "starting"
    assert client.get("/v1/spec").status_code == 503  # past auth, not 401


def test_insecure_dev_with_shared_secrets_checks_them():
    """Development mode with --token / --admin-token: the tiers' secret, and the admin's for the round API."""
    from shared.config.settings import CloudSettings

    token, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    app = cloud_app.create_app(CloudSettings(insecure_dev=True, token=token, admin_token=admin))
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: the cloud is "starting" (503)
    got = {name: client.get(path, headers=headers).status_code for name, path, headers in (
        ("spec without a secret", "/v1/spec", {}), ("spec, wrong secret", "/v1/spec", bearer(token + "x")),
        ("spec, tier secret", "/v1/spec", bearer(token)), ("rounds, tier secret", "/v1/rounds", bearer(token)),
        ("rounds, admin secret", "/v1/rounds", bearer(admin)))}
    assert got == {"spec without a secret": 401, "spec, wrong secret": 401, "spec, tier secret": 503,
                   "rounds, tier secret": 403, "rounds, admin secret": 503}, got
