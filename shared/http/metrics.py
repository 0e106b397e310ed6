"""What a tier counts and exposes: bytes per round and hop, Prometheus text, resident memory."""

from __future__ import annotations

import threading
from collections import defaultdict


from shared.protocol.transport import LinkStats


class ByteLedger:
    """Bytes per (round, mode) on one hop, up (towards the cloud) and down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
        self.total = LinkStats()

    def add(self, key: tuple[int, str] | None, up: int, down: int) -> None:
        self.total.add(up, down)
        if key is None:
            return
        with self._lock:
            c = self._counts[key]
            c[0] += up
            c[1] += down

    def get(self, key: tuple[int, str]) -> dict[str, int]:
        with self._lock:
            up, down = self._counts.get(key, (0, 0))
        return {"up": up, "down": down}


def prometheus(metrics: dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]]) -> str:
    """Prometheus text exposition: ``{name: (type, help, [(labels, value), ...])}``."""
    lines = []
    for name, (kind, help_text, samples) in sorted(metrics.items()):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")
    return "\n".join(lines) + "\n"


def resident_memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
