"""``splitllm memory``: each tier's parameter bytes and peak resident memory in a process of its own."""

from __future__ import annotations

import json

import pytest
import torch



# --- memory ---------------------------------------------------------------------------------------

MEMORY_REPORT = """\
import json
from shared.lab.memory import memory_report
print(json.dumps(memory_report("smollm2-135m", (2, 15))))
"""


@pytest.mark.slow
def test_memory_report_smollm2_user_tier_is_small(run_cli) -> None:
    # Convert the GGUF in one process and report from a fresh, small one: a probe's peak RSS inherits its
    # parent's (see test_memory_probe_peak_rss_is_its_own), and this test process holds large models.
    convert = run_cli([], code="from shared.model.sources import resolve_model; resolve_model('smollm2-135m')")
    assert convert.returncode == 0, convert.stderr[-2000:]
    proc = run_cli([], code=MEMORY_REPORT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: report[k] for k in ("user_param_share", "user_rss_saving_bytes", "user_bytes_not_held")},
          {t: report[t] for t in ("user", "edge", "cloud", "whole")})
    assert report["user_param_share"] <= 0.30
    assert report["user_rss_saving_bytes"] >= report["user_bytes_not_held"]


def test_memory_probe_peak_rss_is_its_own(tiny, run_cli) -> None:
    tiny("tiny-llama")
    ballast = torch.ones(2**28)  # 1 GiB, touched: this process's peak RSS is now above 1 GiB
    try:
        proc = run_cli(["tiny-llama", "1,3", "user", "2", "8"], module="shared.lab.memory")
    finally:
        del ballast
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["param_bytes"] > 0
    assert probe["peak_rss_bytes"] < 2**30  # a tiny-model probe really peaks at a few hundred MB
