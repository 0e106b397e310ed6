"""``splitllm memory``: each tier's parameter bytes and peak resident memory in a process of its own."""

from __future__ import annotations

import json

import pytest
import torch



# --- memory ---------------------------------------------------------------------------------------

MEMORY_REPORT = """\
import json
from shared.lab.memory import memory_report
print(json.dumps(memory_report("smollm2-135m", (2, 15), repeats=1)))
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


def test_memory_report_takes_each_probes_median_run_and_the_shares_range(tiny, monkeypatch) -> None:
    from shared.lab import memory

    tiny("tiny-llama")
    peaks = {"user": [460, 458, 465], "whole": [1512, 1361, 1362]}  # MB, as three runs gave them here
    calls: dict[str, int] = {}

    def fake_probe(model, split, tier, batch_size, seq_len):
        calls[tier] = calls.get(tier, 0) + 1
        mb = peaks.get(tier, [100, 100, 100])[calls[tier] - 1]
        return {"param_bytes": 1 if tier == "user" else 4, "peak_rss_bytes": mb * 10**6, "run": calls[tier]}

    monkeypatch.setattr(memory, "probe_process", fake_probe)
    report = memory.memory_report("tiny-llama", (1, 3), repeats=3)
    assert all(n == 3 for n in calls.values()) and set(calls) == {"user", "edge", "cloud", "whole", "runtime", "imports"}
    assert report["user"]["peak_rss_bytes"] == 460 * 10**6 and report["user"]["run"] == 1  # the median run, whole
    assert report["whole"]["peak_rss_runs_bytes"] == [1361 * 10**6, 1362 * 10**6, 1512 * 10**6]
    assert report["user_rss_share"] == pytest.approx(460 / 1362)
    assert report["user_rss_share_range"] == pytest.approx([458 / 1512, 465 / 1361])
    assert "FAIL" in report["checks"][1] and "30.3% to 34.2%" in report["checks"][1]


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


def test_memory_imports_probe_records_each_import(run_cli) -> None:
    from shared.lab.memory import IMPORTS

    proc = run_cli(["tiny-llama", "1,3", "imports", "2", "8"], module="shared.lab.memory")
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = probe["steps"]
    assert [s["module"] for s in steps] == ["python", *IMPORTS]
    assert all(s["rss_anon_bytes"] > 0 and s["rss_file_bytes"] > 0 for s in steps)
    peaks = [s["peak_rss_bytes"] for s in steps]
    assert peaks == sorted(peaks) and peaks[-1] > 2 * peaks[0]  # torch alone is far above a bare interpreter


@pytest.mark.slow
def test_service_peaks_are_each_process_own(tiny) -> None:
    from shared.lab.memory import service_peaks

    tiny("tiny-llama")
    peaks = service_peaks("tiny-llama", (1, 3), batch_size=2, seq_len=16)
    assert peaks["steps"] == 2 and peaks["batch_shape"][0] == 2
    for name in ("cloud", "edge-0", "user-0"):
        assert 10**8 < peaks[name]["peak_rss_bytes"] < 2**31
        assert peaks[name]["rss_anon_bytes"] + peaks[name]["rss_file_bytes"] <= peaks[name]["peak_rss_bytes"] * 1.01
