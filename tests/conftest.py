"""Shared fixtures: a hermetic model cache, one CPU thread, tiny models and small simulations."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.model.sources import ModelSource
    from shared.lab.sim import Simulation

# Before anything imports transformers / huggingface_hub (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads that
# spin against another process make the first steps of a run 10x slower. Subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every session generates (and converts) its models into a fresh cache of its own."""
    cache = tmp_path_factory.mktemp("splitllm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITLLM_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield cache


@pytest.fixture(scope="session")
def tiny(hermetic_cache: Path) -> Callable[[str], ModelSource]:
    """``tiny("tiny-llama")``: the resolved tiny random model, generated once per session."""
    from shared.model.sources import resolve_model

    return functools.cache(resolve_model)


@pytest.fixture
def model_dir(tiny: Callable[[str], ModelSource], tmp_path: Path) -> Callable[..., Path]:
    """``model_dir(base="tiny-llama", **config)``: a copy of a tiny checkpoint as a user's own directory
    (config.json with ``config`` patched in, a key set to None removed; the weights; no tokenizer files)."""
    import json
    import shutil

    def make(base: str = "tiny-llama", **config: object) -> Path:
        out = tmp_path / f"model-{len(list(tmp_path.glob('model-*')))}"
        shutil.copytree(tiny(base).path, out)
        (out / "byte_tokenizer.json").unlink()
        data = {**json.loads((out / "config.json").read_text()), **config}
        (out / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
        return out

    return make


@pytest.fixture(scope="session")
def small_sim(hermetic_cache: Path) -> Callable[..., Simulation]:
    """``small_sim(**overrides)``: a few users on tiny-llama/shakespeare with very small settings."""
    from shared.config.round import RoundConfig
    from shared.lab.sim import SimConfig, Simulation

    def make(**overrides: object) -> Simulation:
        """Round fields (``local_steps``, ``algorithm``, ``config``, ...) go into the round's configuration."""
        settings: dict[str, object] = dict(
            model="tiny-llama", data="shakespeare", users=2, edges=1, rounds=1, split=(1, 3),
            max_len=16, max_examples_per_client=8, eval_examples_per_client=2, baseline_eval=False,
        )
        round_fields = {"local_steps": 2, "batch_size": 2}
        for name, value in overrides.items():
            (round_fields if name in RoundConfig.model_fields else settings)[name] = value
        return Simulation(SimConfig(**settings, round=RoundConfig(**round_fields)))

    return make


@pytest.fixture(scope="session")
def run_cli(hermetic_cache: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(args)``: ``python -m shared.lab.cli ARGS`` from the repository root, in this session's cache.

    ``module=...`` runs another module; ``code=...`` runs ``python -c CODE ARGS`` (to patch something first).
    """

    def run(args: list[str], *, code: str | None = None, module: str = "shared.lab.cli",
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", module, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # SPLITLLM_CACHE, HF_HUB_OFFLINE, OMP_NUM_THREADS
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    return run
