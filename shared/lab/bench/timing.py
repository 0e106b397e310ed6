"""What every timed bench records beside its figures: how busy the machine was, CPU seconds of processes.

A wall-clock figure from a machine that other jobs share is an indication only; each timed bench records
the machine's load average before and after its timed part (``machine``), and, where it can, CPU seconds,
which depend far less on what else runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Self

from shared.config.heap import heap_policy
from shared.lab.bench.busy import BusySampler

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")
PROC_STAT = Path("/proc/stat")


def reported_kib() -> int | None:
    """Free memory this machine's kernel has reported to its hypervisor so far, in kB (free page reporting: a VM
    hands free pages back to its host, and a page faulted in again after that costs the host's work as well as
    the guest's); None where the kernel does not report."""
    try:
        return int(REPORTED_KIB.read_text())
    except (OSError, ValueError):
        return None


def steal_seconds() -> float | None:
    """CPU seconds the hypervisor has so far given this machine's virtual cores to something else while they had
    work to run (``steal`` in /proc/stat, all cores together); None where the kernel does not say."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
        return int(fields[8]) / TICKS
    except (OSError, ValueError, IndexError):
        return None


class Machine:
    """The machine's cores and load around a timed part: ``with Machine() as m: ...``; ``m.record`` for the JSON.
    ``reported_to_host_mb``: the free memory the kernel handed back to a hypervisor meanwhile (None: not a VM
    that reports); ``steal_s``: the core-seconds the hypervisor ran something else meanwhile while these cores had
    work (``steal_seconds``)."""

    def __enter__(self) -> Self:
        self.before, self.reported_before, self.steal_before = load(), reported_kib(), steal_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.after, self.reported_after, self.steal_after = load(), reported_kib(), steal_seconds()

    @property
    def record(self) -> dict[str, Any]:
        cpus = os.cpu_count() or 1
        after = getattr(self, "after", load())
        reported = getattr(self, "reported_after", reported_kib())
        steal = getattr(self, "steal_after", steal_seconds())
        return {"cpus": cpus, "load_before": self.before, "load_after": after,
                "busy": max(self.before[0], after[0]) > 0.5 * cpus, "heap": heap_policy(),
                "reported_to_host_mb": None if reported is None or self.reported_before is None
                else round((reported - self.reported_before) / 1024, 1),
                "steal_s": None if steal is None or self.steal_before is None else round(steal - self.steal_before, 2)}


def process_counters(pid: int | str = "self") -> dict[str, float]:
    """What process ``pid`` has used so far (Linux): user and system CPU seconds, and its minor page faults (pages
    the kernel mapped in for it, zeroed when new: a heap that keeps giving memory back and taking it again)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"user_s": int(fields[11]) / TICKS, "system_s": int(fields[12]) / TICKS, "minor_faults": int(fields[7])}


def counters_since(before: dict[int | str, dict[str, float]],
                   now: dict[int | str, dict[str, float]] | None = None) -> dict[str, float]:
    """What the processes in ``before`` (pid -> its ``process_counters`` then) have used since, added up: up to
    ``now`` (the same, read later), or to this moment."""
    now = now if now is not None else {pid: process_counters(pid) for pid in before}
    out = {"user_s": 0.0, "system_s": 0.0, "minor_faults": 0}
    for pid, then in before.items():
        for key in out:
            out[key] += now[pid][key] - then[key]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (Linux)."""
    c = process_counters(pid)
    return c["user_s"] + c["system_s"]


def timed_round(cluster: Any, body: dict[str, Any], sample_s: float | None = None) -> dict[str, Any]:
    """One round of a running ``shared.lab.cluster.Cluster``: its final view (``view``), its wall seconds as this
    process timed them (``wall``), the CPU seconds each of the cluster's processes used meanwhile
    (``cpu_seconds``, by process name), all of them together (``counters``: ``counters_since``) and each one's
    (``counters_by_process``), the machine's load around it (``machine``), and the CPU seconds this process took
    meanwhile (``harness_cpu_seconds``: starting the round and polling it, on the cores the cluster computes on).
    With ``sample_s``, also the processes' CPU seconds every ``sample_s`` seconds (``busy``: ``BusySampler``)."""
    pids = {name: p.popen.pid for name, p in cluster.procs.items() if p.popen is not None}
    before = {pid: process_counters(pid) for pid in pids.values()}
    t0, own0 = time.perf_counter(), time.process_time()
    sampler = BusySampler(list(pids.values()), cpu_seconds, sample_s) if sample_s else None
    with Machine() as machine, sampler or nullcontext():
        view = cluster.run_round(body)
    wall, own = time.perf_counter() - t0, time.process_time() - own0
    after = {pid: process_counters(pid) for pid in before}  # each process read once, both figures from it
    cpu = {name: sum(after[pid][k] - before[pid][k] for k in ("user_s", "system_s")) for name, pid in pids.items()}
    return {"view": view, "wall": wall, "cpu_seconds": cpu, "counters": counters_since(before, after),
            "counters_by_process": {name: counters_since({pid: before[pid]}, after) for name, pid in pids.items()},
            "machine": machine.record, "harness_cpu_seconds": own, **({"busy": sampler.record} if sampler else {})}


def write_json(report: dict[str, Any], path: str | None) -> None:
    """A bench's report as JSON at ``path`` (its folder made), when a path is given, with what it was measured on
    (``provenance``: the CPU, the libraries, the commit) unless the report says so already."""
    if path:
        from shared.lab.bench.provenance import provenance

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**report, "provenance": report.get("provenance") or provenance()},
                                         indent=2, default=str))


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: ``head``, the rule under it, then ``rows``."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def save(report: dict[str, Any], json_path: str | None, plot_path: str | None,
         plot: Callable[[dict[str, Any], str], None]) -> None:
    """A bench's outputs: its report as JSON (``write_json``) and, when a path is given, its plot."""
    write_json(report, json_path)
    if plot_path:
        plot(report, plot_path)
