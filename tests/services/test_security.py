"""Security of the three tiers' HTTP surface: bearer tokens, the admin-only round API, no pickle anywhere,
and services that refuse to start without a token (hostile tensors and updates: test_hostile_input.py).

Most tests drive the real FastAPI apps in-process (``inprocess_stack`` of stack_helpers.py): one cloud, one
edge and one user, each behind a ``TestClient``, registered with each other through their own HTTP routes.
The start-up checks run the real ``splitllm <tier>`` command lines in subprocesses.
"""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import msgpack
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from shared.protocol.wire import CONTENT_TYPE, Message, encode
# the in-process deployment; re-exported here for modules that import it from test_security
from stack_helpers import TIERS, AcceptingLink, Stack, bearer, inprocess_stack, wait_round  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("security")) as s:
        yield s

# -- tokens -----------------------------------------------------------------------------------------------

PATH_VALUES = {"round_id": "1", "version": "0", "edge_id": "edge-0"}
OPEN_PATHS = ("/healthz", "/metrics", "/docs", "/openapi.json")


def v1_routes(app: Any) -> list[tuple[str, str, bool]]:
    """(method, concrete path, takes a JSON body) of every /v1 route of an app."""
    out = []
    for r in app.routes:
        if isinstance(r, APIRoute) and r.path.startswith("/v1"):
            path = r.path
            for name, value in PATH_VALUES.items():
                path = path.replace("{" + name + "}", value)
            assert "{" not in path, f"no test value for a path parameter of {r.path}"
            for method in sorted(r.methods):
                out.append((method, path, r.body_field is not None))
    return out


def call(client: TestClient, method: str, path: str, json_body: bool, headers: dict[str, str]) -> httpx.Response:
    if method == "POST":
        if json_body:
            return client.post(path, json={}, headers=headers)
        return client.post(path, content=b"", headers={**headers, "content-type": CONTENT_TYPE})
    return client.request(method, path, headers=headers)


def test_every_tier_exposes_the_expected_v1_routes(stack):
    routes = {t: {(m, p) for m, p, _ in v1_routes(stack.apps[t])} for t in TIERS}
    assert ("POST", "/v1/rounds") in routes["cloud"] and ("POST", "/v1/rounds/1/cancel") in routes["cloud"]
    assert {("POST", "/v1/step"), ("POST", "/v1/start"), ("POST", "/v1/update")} <= routes["edge"]
    assert ("POST", "/v1/start") in routes["user"]
    assert sum(len(r) for r in routes.values()) >= 17, routes


@pytest.mark.parametrize("tier", TIERS)
def test_v1_endpoints_refuse_missing_or_wrong_tokens_with_401(stack, tier):
    client = stack.clients[tier]
    wrong = {
        "none": {},
        "wrong token": bearer(secrets.token_urlsafe(18)),
        "token with a suffix": bearer(stack.token + "x"),
        "token prefix": bearer(stack.token[:-1]),
        "empty bearer": {"authorization": "Bearer "},
        "basic scheme": {"authorization": f"Basic {stack.token}"},
        "bare token": {"authorization": stack.token},
        "non-ascii": {"authorization": b"Bearer \xff\xfe"},
    }
    if tier != "cloud":  # the admin token is the cloud's alone
        wrong["admin token"] = bearer(stack.admin)
    for method, path, json_body in v1_routes(stack.apps[tier]):
        for name, headers in wrong.items():
            r = call(client, method, path, json_body, headers)
            assert r.status_code == 401, (tier, method, path, name, r.status_code, r.text)
            assert r.headers.get("www-authenticate") == "Bearer", (tier, path, name)
            assert isinstance(r.json()["detail"], str)


def test_round_api_needs_the_admin_token(stack):
    client = stack.clients["cloud"]
    rounds_before = len(client.get("/v1/rounds", headers=bearer(stack.token)).json()["rounds"])
    for method, path in (("POST", "/v1/rounds"), ("POST", "/v1/rounds/1/cancel")):
        r = client.request(method, path, json={"evaluate": False}, headers=bearer(stack.token))
        assert r.status_code == 403, (path, r.text)
        assert "admin" in r.json()["detail"]
    assert len(client.get("/v1/rounds", headers=bearer(stack.token)).json()["rounds"]) == rounds_before, \
        "a refused start must not create a round"
    r = client.post("/v1/rounds", json={"local_steps": 1, "evaluate": False}, headers=bearer(stack.admin))
    assert r.status_code == 202, r.text
    rid = r.json()["round_id"]
    r = client.post(f"/v1/rounds/{rid}/cancel", headers=bearer(stack.admin))
    assert r.status_code == 200, r.text
    assert wait_round(stack, rid)["state"] in ("cancelled", "committed")
    assert client.post("/v1/rounds/999/cancel", headers=bearer(stack.admin)).status_code == 404
    # the admin token also reads (peer endpoints take either token)
    for path in ("/v1/rounds", f"/v1/rounds/{rid}", "/v1/spec", "/v1/adapters/0"):
        assert client.get(path, headers=bearer(stack.admin)).status_code == 200, path
    # the tier token reads too, and the token scheme is case-insensitive
    assert client.get("/v1/rounds", headers={"authorization": f"bearer {stack.token}"}).status_code == 200


@pytest.mark.parametrize("tier", TIERS)
def test_health_metrics_and_docs_are_open(stack, tier):
    for path in OPEN_PATHS:
        r = stack.clients[tier].get(path)
        assert r.status_code == 200, (tier, path, r.text[:200])
    metrics = stack.clients[tier].get("/metrics").text
    assert "process_resident_memory_bytes" in metrics
    assert stack.token not in metrics and stack.admin not in metrics


def test_unauthenticated_requests_are_refused_before_their_body_is_parsed(stack):
    for tier, path in (("cloud", "/v1/edges"), ("cloud", "/v1/rounds"), ("edge", "/v1/users")):
        r = stack.clients[tier].post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401, (tier, path, r.status_code, r.text)


# -- no pickle --------------------------------------------------------------------------------------------

class _Marker:
    """Unpickling this creates ``path`` (opening a file for writing is enough to prove code ran)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


PICKLE_TYPES = ("application/x-msgpack", "application/octet-stream", "application/python-pickle")


@pytest.mark.parametrize("tier", TIERS)
def test_no_endpoint_unpickles(stack, tier, tmp_path):
    marker = tmp_path / f"pwned-{tier}"
    payload = pickle.dumps(_Marker(marker))
    msgpack_wrapped = [
        msgpack.packb({"v": 1, "kind": "step", "meta": {}, "tensors": {}, "x": msgpack.ExtType(1, payload)}),
        msgpack.packb({"v": 1, "kind": "step", "meta": {"x": msgpack.ExtType(1, payload)}, "tensors": {}}),
        msgpack.packb(msgpack.ExtType(1, payload)),
        encode(Message("step", {"round": 1, "user": "user-0", "step": 0, "mode": "train", "blob": payload})),
    ]
    posts = [(p, json_body) for m, p, json_body in v1_routes(stack.apps[tier]) if m == "POST"]
    assert posts
    for path, json_body in posts:
        for ctype in PICKLE_TYPES:
            for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
                body = pickle.dumps(_Marker(marker), protocol=protocol)
                r = stack.clients[tier].post(path, content=body, headers={**bearer(stack.token), "content-type": ctype})
                assert 400 <= r.status_code < 500, (tier, path, ctype, protocol, r.status_code, r.text[:200])
        for body in msgpack_wrapped:
            r = stack.clients[tier].post(path, content=body, headers={**bearer(stack.token), "content-type": CONTENT_TYPE})
            assert 400 <= r.status_code < 500, (tier, path, r.status_code, r.text[:200])
    time.sleep(0.2)  # anything a handler started in the background has had its chance
    assert not marker.exists(), f"{tier} unpickled a request body"
    assert stack.clients[tier].get("/healthz").status_code == 200


@pytest.mark.parametrize("tier", ["cloud", "edge"])
def test_json_routes_answer_non_utf8_bodies_with_4xx(stack, tier):
    bad = []
    for method, path, json_body in v1_routes(stack.apps[tier]):
        if method == "POST" and json_body:
            for ctype in ("application/x-msgpack", "application/octet-stream"):
                r = stack.clients[tier].post(path, content=b"\x80\x04\x95", headers={**bearer(stack.token),
                                                                                  "content-type": ctype})
                if not 400 <= r.status_code < 500:
                    bad.append((path, ctype, r.status_code))
    assert not bad, bad


# -- start-up -----------------------------------------------------------------------------------------------

def _service(tier: str, *args: str, env_drop: tuple[str, ...] = ("SPLITLLM_TOKEN", "SPLITLLM_ADMIN_TOKEN"),
             **env: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in env_drop}
    full.update({"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", **env})
    return subprocess.Popen([sys.executable, "-m", "shared.lab.cli", tier, "--port", "0", *args], cwd=REPO_ROOT,
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until(proc: subprocess.Popen, needle: str, timeout: float = 60.0) -> str:
    """stderr lines until one contains ``needle`` (or the process ends); the process is then stopped."""
    seen = []
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if needle in line:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return "".join(seen)


def test_services_without_a_token_refuse_to_start(tmp_path):
    cases = {
        "cloud": _service("cloud", "--data-dir", str(tmp_path / "c1")),
        "edge": _service("edge", "--cloud", "http://127.0.0.1:9"),
        "user": _service("user", "--edge", "http://127.0.0.1:9"),
        "cloud without admin token": _service("cloud", "--data-dir", str(tmp_path / "c2"), SPLITLLM_TOKEN="t" * 24),
    }
    for name, proc in cases.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert "error: no " in lines[0] and "token" in lines[0] and "--insecure-dev" in lines[0], (name, lines[0])
        assert out == ""
    assert not (tmp_path / "c1").exists(), "a refused cloud must not create its data directory"


def test_an_empty_token_is_refused_at_start():
    proc = _service("edge", "--cloud", "http://127.0.0.1:9", SPLITLLM_TOKEN="")
    err = _until(proc, "Uvicorn running", timeout=60)
    assert proc.returncode == 2 and "token" in err, err[-1000:]


def test_insecure_dev_is_announced_loudly(tmp_path):
    procs = {
        "cloud": _service("cloud", "--insecure-dev", "--data-dir", str(tmp_path / "c")),
        "edge": _service("edge", "--insecure-dev", "--cloud", "http://127.0.0.1:9"),
        "user": _service("user", "--insecure-dev", "--edge", "http://127.0.0.1:9"),
    }
    for tier, proc in procs.items():
        err = _until(proc, "Never expose", timeout=90)
        assert f"splitllm {tier}: INSECURE DEVELOPMENT MODE" in err, (tier, err[-2000:])
        assert "WITHOUT tokens" in err and "!" * 40 in err, (tier, err[-2000:])


def test_insecure_dev_really_skips_the_token_check():
    from edge_server.app import create_app
    from shared.config.settings import EdgeSettings

    app = create_app(EdgeSettings(cloud="http://127.0.0.1:9", insecure_dev=True))
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: the edge is "starting"
    assert client.get("/v1/spec").status_code == 503  # past auth, not 401
