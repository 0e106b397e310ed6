"""Every ``splitllm`` process lets idle OpenMP threads sleep after a short spin, unless its environment says otherwise."""

from __future__ import annotations

import os

import pytest

from shared.config.threads import SPIN_COUNT, sleep_idle_threads
from shared.lab.cli import main


def test_idle_threads_spin_briefly_then_sleep_unless_the_environment_sets_a_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a policy of the environment's own: its spin is left alone too
    monkeypatch.delenv("GOMP_SPINCOUNT")
    sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ

    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")  # a spin count of its own, under the policy set here
    sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "0"


def test_the_splitllm_command_sets_it_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT
