"""The verifier's memory of nonces (shared.http.credentials.Verifier): a replay within the window is refused, and
each request forgets only what has expired, oldest first, so its cost does not grow with the requests remembered.

It used to rebuild the whole memory on every request once it held over 4096 nonces: a credential that sent
many cheap signed requests made each one cost a pass over all of them (1.7 ms at 30,000, under the lock)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from fastapi import HTTPException
from starlette.datastructures import Headers

from shared.http import credentials
from shared.http.auth import Auth, rule
from shared.http.credentials import (CERT_HEADER, MAX_NONCE, SIGNATURE_HEADER, SIGNED_HEADER, CredentialError,
                                     TooManyRequests, Verifier, b64url, init_deployment, issue, load_private_key,
                                     load_public_key, signing_input)


def test_nonces_are_remembered_for_the_window_and_then_forgotten_oldest_first(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    key_path, pub_path = init_deployment(tmp_path)
    credential = issue(load_private_key(key_path), "splitllm", "user", "user-0", 3600)
    verifier = Verifier(load_public_key(pub_path), "splitllm", max_skew=10.0)
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    first = [credential.sign("GET", "/v1/spec", "edge") for _ in range(100)]
    for headers in first:
        verifier.request(headers, "GET", "/v1/spec", {"edge"})
    with pytest.raises(CredentialError, match="replayed"):
        verifier.request(first[0], "GET", "/v1/spec", {"edge"})
    clock[0] += 5.0
    later = credential.sign("GET", "/v1/spec", "edge")
    verifier.request(later, "GET", "/v1/spec", {"edge"})
    assert len(verifier._seen) == 101  # nothing has expired yet (remembered for twice the skew)
    clock[0] += 16.0  # the first 100 expired; the later one is remembered
    fresh = credential.sign("GET", "/v1/spec", "edge")
    verifier.request(fresh, "GET", "/v1/spec", {"edge"})
    assert len(verifier._seen) == 2
    with pytest.raises(CredentialError, match="replayed"):
        verifier.request(fresh, "GET", "/v1/spec", {"edge"})


def test_one_credential_gets_its_allowance_of_requests_a_window_and_429_beyond_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory one credential can make a receiver keep is bounded: its allowance of nonces a window (then 429,
    with when to retry), and each nonce at most MAX_NONCE characters. Another credential is not touched."""
    key_path, pub_path = init_deployment(tmp_path)
    key = load_private_key(key_path)
    hostile, other = (issue(key, "splitllm", "user", f"user-{i}", 3600) for i in range(2))
    verifier = Verifier(load_public_key(pub_path), "splitllm", max_skew=10.0)
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setitem(credentials.NONCES_PER_WINDOW, "user", 5)
    for _ in range(5):
        verifier.request(hostile.sign("GET", "/v1/spec", "edge"), "GET", "/v1/spec", {"edge"})
    with pytest.raises(TooManyRequests, match="allowance") as refused:
        verifier.request(hostile.sign("GET", "/v1/spec", "edge"), "GET", "/v1/spec", {"edge"})
    assert 1.0 <= refused.value.retry_after <= 20.0
    verifier.request(other.sign("GET", "/v1/spec", "edge"), "GET", "/v1/spec", {"edge"})  # its own allowance
    clock[0] += 21.0  # the window has passed: the allowance is whole again
    verifier.request(hostile.sign("GET", "/v1/spec", "edge"), "GET", "/v1/spec", {"edge"})
    assert verifier._held == {hostile.principal().jti: 1}
    params = f"ts={int(clock[0])};nonce={'A' * (MAX_NONCE + 1)};aud=edge;digest={hashlib.sha256(b'').hexdigest()}"
    long_nonce = {CERT_HEADER: hostile.certificate, SIGNED_HEADER: params,
                  SIGNATURE_HEADER: b64url(hostile.key.sign(signing_input("GET", "/v1/spec", params)))}
    with pytest.raises(CredentialError, match="nonce must be"):
        verifier.request(long_nonce, "GET", "/v1/spec", {"edge"})


def test_over_its_allowance_a_caller_gets_429_with_retry_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_path, pub_path = init_deployment(tmp_path)
    credential = issue(load_private_key(key_path), "splitllm", "user", "user-0", 3600)
    auth = Auth(Verifier(load_public_key(pub_path), "splitllm"), {"edge"}, [rule("GET", "/v1/spec", "user")])
    monkeypatch.setitem(credentials.NONCES_PER_WINDOW, "user", 1)
    auth.check(Headers(credential.sign("GET", "/v1/spec", "edge")), "GET", "/v1/spec", "/v1/spec")
    with pytest.raises(HTTPException) as refused:
        auth.check(Headers(credential.sign("GET", "/v1/spec", "edge")), "GET", "/v1/spec", "/v1/spec")
    assert refused.value.status_code == 429 and int(refused.value.headers["Retry-After"]) >= 1
