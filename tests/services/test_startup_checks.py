"""Start-up security checks, through the real ``splitllm <tier>`` command lines in subprocesses: outside
``--insecure-dev`` a tier needs its own credential and the deployment's trust key, and takes no shared token;
in development mode the shared secrets must be strong and distinct, and the mode is announced loudly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import uvicorn

from shared.http.credentials import issue, load_private_key, write_private
from shared.lab.credentials import provision

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("SPLITLLM_TOKEN", "SPLITLLM_ADMIN_TOKEN", "SPLITLLM_CREDENTIAL", "SPLITLLM_TRUST_KEY", "SPLITLLM_DEPLOYMENT")
LONG = "a-development-secret-of-enough-length"
OTHER_LONG = "another-development-secret-quite-long"


def _service(tier: str, *args: str, **env: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in SECRETS}
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


def test_tiers_refuse_to_start_without_their_credentials(tmp_path):
    """The real command lines: exit 2, one line on stderr that says what is missing and names --insecure-dev."""
    cases = {
        "cloud": _service("cloud", "--data-dir", str(tmp_path / "c1")),
        "edge": _service("edge", "--cloud", "http://127.0.0.1:9"),
        "user": _service("user", "--edge", "http://127.0.0.1:9"),
    }
    for name, proc in cases.items():
        out, err = proc.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and out == "", (name, proc.returncode, err[-1500:])
        assert "error: no credential or trust_key" in lines[0] and "--insecure-dev" in lines[0], (name, lines[0])
    assert not (tmp_path / "c1").exists(), "a refused cloud must not create its data directory"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Credential files: this deployment's, another deployment's (another key), and one for another deployment name."""
    creds = provision(tmp_path_factory.mktemp("keys"), ["edge-0"], {"user-0": 0})
    elsewhere = provision(tmp_path_factory.mktemp("elsewhere"), ["edge-0"], {"user-0": 0})
    renamed = creds.directory / "edge-0-elsewhere.json"
    write_private(renamed, issue(load_private_key(creds.directory / "deployment.key"), "elsewhere", "edge", "edge-0",
                                 3600).to_json())
    return {"edge": creds.env("edge-0"), "cloud": creds.env("cloud"), "user-0": str(creds.credentials["user-0"]),
            "other key": str(elsewhere.credentials["edge-0"]), "other trust key": str(elsewhere.trust_key),
            "other name": str(renamed)}


NO_CLOUD, NO_EDGE = ["edge", "--cloud", "http://127.0.0.1:9"], ["user", "--edge", "http://127.0.0.1:9"]
CREDENTIAL, TRUST_KEY = "SPLITLLM_CREDENTIAL", "SPLITLLM_TRUST_KEY"
REFUSED: dict[str, tuple[list[str], Callable[[dict[str, Any]], dict[str, str]], tuple[str, ...]]] = {
    # name -> (argv, the environment from ``keys``, words the one line of error holds)
    "edge without the trust key": (NO_CLOUD, lambda k: {CREDENTIAL: k["edge"][CREDENTIAL]}, ("no trust_key",)),
    "user without its credential": (NO_EDGE, lambda k: {TRUST_KEY: k["edge"][TRUST_KEY]}, ("no credential",)),
    "edge with a shared token": (NO_CLOUD, lambda k: {**k["edge"], "SPLITLLM_TOKEN": LONG},
                                 ("--token", "development only")),
    "an empty token": (NO_CLOUD, lambda k: {**k["edge"], "SPLITLLM_TOKEN": ""}, ("--token", "development only")),
    "cloud with an admin token": (["cloud", "--admin-token", LONG], lambda k: k["cloud"],
                                  ("--admin-token", "development only")),
    "an edge given a user's credential": (NO_CLOUD, lambda k: {**k["edge"], CREDENTIAL: k["user-0"]},
                                          ("edge was given a user credential",)),
    "a credential from another deployment key": (NO_CLOUD, lambda k: {**k["edge"], CREDENTIAL: k["other key"]},
                                                 ("invalid credential",)),
    "a trust key of another deployment": (NO_CLOUD, lambda k: {**k["edge"], TRUST_KEY: k["other trust key"]},
                                          ("invalid credential",)),
    "a credential for another deployment name": (NO_CLOUD, lambda k: {**k["edge"], CREDENTIAL: k["other name"]},
                                                 ("'elsewhere'",)),
    "a short development token": ([*NO_CLOUD, "--insecure-dev"], lambda k: {"SPLITLLM_TOKEN": "short-secret"},
                                  ("--token", "at least 24")),
    "an empty development token": ([*NO_EDGE, "--insecure-dev"], lambda k: {"SPLITLLM_TOKEN": ""},
                                   ("--token", "at least 24")),
    "a short development admin token": (["cloud", "--insecure-dev", "--admin-token", "x" * 23],
                                        lambda k: {"SPLITLLM_TOKEN": LONG}, ("--admin-token", "at least 24")),
    "equal development tokens": (["cloud", "--insecure-dev", "--token", OTHER_LONG, "--admin-token", OTHER_LONG],
                                 lambda k: {}, ("must differ",)),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_start_up_refusals(keys, case, tmp_path, monkeypatch, capsys):
    """``splitllm <tier> ...`` (the CLI's entry point, in this process): exit 2 with one line, nothing started."""
    from shared.lab.cli import main

    argv, env, words = REFUSED[case]
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env(keys).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail(f"{case}: the tier started"))
    data_dir = ["--data-dir", str(tmp_path / "cloud")] if argv[0] == "cloud" else []
    code = main([*argv, *data_dir, "--port", "0"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and out == "", (code, out, err)
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "cloud").exists(), "a refused cloud must not create its data directory"


def test_an_explicit_id_that_disagrees_with_the_credential_is_refused_at_start(tmp_path):
    """Identity defaults come from the credential; a flag naming another id stops the tier with one line."""
    creds = provision(tmp_path / "keys", ["edge-0"], {"user-0": 0})
    cases = {
        "edge": _service("edge", "--cloud", "http://127.0.0.1:9", "--edge-id", "edge-7", **creds.env("edge-0")),
        "user": _service("user", "--edge", "http://127.0.0.1:9", "--user-id", "user-7", **creds.env("user-0")),
    }
    bad = []
    for name, proc in cases.items():
        err = _until(proc, "Uvicorn running", timeout=120)
        lines = err.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or "differs" not in lines[0]:
            bad.append((name, proc.returncode, err[-1500:]))
    assert not bad, "\n".join(map(str, bad))


def test_insecure_dev_is_announced_loudly(tmp_path):
    procs = {
        "cloud": _service("cloud", "--insecure-dev", "--data-dir", str(tmp_path / "c")),
        "edge": _service("edge", "--insecure-dev", "--cloud", "http://127.0.0.1:9"),
        "user": _service("user", "--insecure-dev", "--edge", "http://127.0.0.1:9", SPLITLLM_TOKEN=OTHER_LONG),
    }
    for tier, proc in procs.items():
        err = _until(proc, "Never expose", timeout=90)
        assert f"splitllm {tier}: INSECURE DEVELOPMENT MODE" in err, (tier, err[-2000:])
        assert "WITHOUT credentials" in err and "!" * 40 in err, (tier, err[-2000:])
