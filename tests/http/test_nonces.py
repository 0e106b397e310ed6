"""The verifier's memory of nonces (shared.http.credentials.Verifier): a replay within the window is refused, and
each request forgets only what has expired, oldest first, so its cost does not grow with the requests remembered.

It used to rebuild the whole memory on every request once it held over 4096 nonces: a credential that sent
many cheap signed requests made each one cost a pass over all of them (1.7 ms at 30,000, under the lock)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.http.credentials import CredentialError, Verifier, init_deployment, issue, load_private_key, load_public_key


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
