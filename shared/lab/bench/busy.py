"""When a timed part kept the cores busy: every process's CPU seconds read from /proc every ``interval`` seconds.

A round's total CPU seconds say how far it is from its CPU floor; they do not say where the cores sat idle. A
``BusySampler`` around the round records the processes' cumulative CPU seconds (``cpu_s``, all of them together)
at each moment (``t``, seconds since it began); ``idle_by_part`` turns that into the core-seconds left idle in
each tenth of the round (a round's start and end against its middle).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from itertools import pairwise
from typing import Any, Self


class BusySampler:
    """``with BusySampler(pids, read) as s: ...``; ``s.record``: ``{"interval_s", "t", "cpu_s"}`` (lists of the same
    length, the first sample at t = 0 and the last when the block ended). ``read(pid)``: a process's CPU seconds so
    far (``timing.cpu_seconds``). A process that has exited keeps its last reading."""

    def __init__(self, pids: list[int], read: Callable[[int], float], interval: float = 0.2) -> None:
        self.pids, self.read, self.interval = list(pids), read, interval
        self.last: dict[int, float] = {}
        self.t: list[float] = []
        self.cpu: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="busy-sampler", daemon=True)

    def _read(self) -> None:
        now = time.perf_counter() - self.t0
        for pid in self.pids:
            try:
                self.last[pid] = self.read(pid)
            except (OSError, IndexError, ValueError):  # gone (or going) meanwhile
                self.last.setdefault(pid, 0.0)
        self.t.append(round(now, 4))
        self.cpu.append(round(sum(self.last.values()), 3))

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._read()

    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        self._read()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._read()

    @property
    def record(self) -> dict[str, Any]:
        return {"interval_s": self.interval, "t": self.t, "cpu_s": self.cpu}


def idle_by_part(record: dict[str, Any], cpus: int, parts: int = 10) -> list[float]:
    """The core-seconds left idle in each of ``parts`` equal slices of the sampled span: the cores' time in the slice
    less the CPU seconds used in it (the cumulative readings interpolated at the slice's ends)."""
    t, c = record["t"], record["cpu_s"]
    if len(t) < 2 or t[-1] <= 0:
        return [0.0] * parts

    def at(x: float) -> float:
        i = min(max(bisect_left(t, x), 1), len(t) - 1)  # the first reading at or after x
        span = t[i] - t[i - 1]
        return c[i - 1] + ((c[i] - c[i - 1]) * (x - t[i - 1]) / span if span > 0 else 0.0)

    edges = [t[-1] * k / parts for k in range(parts + 1)]
    return [round(cpus * (b - a) - (at(b) - at(a)), 2) for a, b in pairwise(edges)]
