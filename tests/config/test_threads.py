"""Every ``splitllm`` process lets idle OpenMP threads sleep, unless its environment says otherwise."""

from __future__ import annotations

import os

import pytest

from shared.lab.cli import main
from shared.config.threads import sleep_idle_threads


def test_idle_threads_sleep_unless_the_environment_sets_a_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_splitllm_command_sets_it_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
