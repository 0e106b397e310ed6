"""Where a timed part's cores sat idle (``shared.lab.bench.busy``): the sampler reads real processes' CPU seconds, and
the idle core-seconds per slice follow from the cumulative readings."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shared.lab.bench import timing
from shared.lab.bench.busy import BusySampler, idle_by_part
from shared.lab.bench.report import idle_ends
from shared.lab.bench.timing import Machine, cpu_seconds, steal_seconds


def test_idle_core_seconds_per_slice_follow_the_cumulative_readings() -> None:
    # 2 cores over 10 s: idle for the first 2 s, both busy from 2 to 9 s, one busy in the last second
    record = {"interval_s": 1.0, "t": [0, 2, 9, 10], "cpu_s": [0.0, 0.0, 14.0, 15.0]}
    assert idle_by_part(record, cpus=2, parts=10) == [2.0, 2.0, 0, 0, 0, 0, 0, 0, 0, 1.0]
    assert idle_by_part(record, cpus=2, parts=5) == [4.0, 0, 0, 0, 1.0]
    # a slice's ends between two readings are interpolated: 1 core busy throughout, read every 3 s
    record = {"interval_s": 3.0, "t": [0, 3, 6], "cpu_s": [0.0, 3.0, 6.0]}
    assert idle_by_part(record, cpus=2, parts=4) == [1.5, 1.5, 1.5, 1.5]
    assert idle_by_part({"interval_s": 1, "t": [0], "cpu_s": [0.0]}, cpus=2, parts=3) == [0.0, 0.0, 0.0]


def test_the_sampler_reads_a_busy_and_an_idle_process() -> None:
    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\n"
            "print('burnt', flush=True)\ntime.sleep(30)")
    busy = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with BusySampler([busy.pid, idle.pid], cpu_seconds, interval=0.05) as sampler:
            assert busy.stdout is not None and busy.stdout.readline().strip() == "burnt"
            time.sleep(0.2)
        record = sampler.record
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
    assert record["interval_s"] == 0.05 and len(record["t"]) == len(record["cpu_s"]) >= 5
    assert record["t"][0] < 0.01 and record["t"] == sorted(record["t"])
    assert record["cpu_s"] == sorted(record["cpu_s"])  # cumulative
    assert 0.78 <= record["cpu_s"][-1] - record["cpu_s"][0] <= 2.0  # the burner's 0.8 s, and the start-ups
    idle_s = sum(idle_by_part(record, cpus=os.cpu_count() or 1))
    assert idle_s == pytest.approx((os.cpu_count() or 1) * record["t"][-1] - (record["cpu_s"][-1] - record["cpu_s"][0]),
                                   abs=0.05)


def test_a_process_gone_meanwhile_keeps_its_last_reading() -> None:
    short = subprocess.Popen([sys.executable, "-c", "pass"])
    short.wait()
    with BusySampler([short.pid], cpu_seconds, interval=0.05) as sampler:
        time.sleep(0.2)
    assert set(sampler.record["cpu_s"]) == {0.0}


def test_the_report_gives_the_ends_and_the_middle() -> None:
    assert idle_ends([1.0, 0.2, 0.3, 0, 0, 0, 0, 0, 0.5, 1.4]) == "1.0 / 1.0 / 1.4"
    assert idle_ends(None) == "-"


def test_the_machine_record_says_what_the_hypervisor_took(tmp_path, monkeypatch) -> None:
    stat = tmp_path / "stat"
    monkeypatch.setattr(timing, "PROC_STAT", stat)
    assert steal_seconds() is None  # no such file: not a Linux machine
    stat.write_text(f"cpu  10 0 5 100 0 0 0 {2 * timing.TICKS} 0 0\ncpu0 1 2 3\n")
    assert steal_seconds() == pytest.approx(2.0)
    with Machine() as machine:
        stat.write_text(f"cpu  10 0 5 100 0 0 0 {7 * timing.TICKS} 0 0\n")
    assert machine.record["steal_s"] == pytest.approx(5.0)
    if sys.platform == "linux":
        monkeypatch.setattr(timing, "PROC_STAT", timing.Path("/proc/stat"))
        assert steal_seconds() is not None and steal_seconds() >= 0
