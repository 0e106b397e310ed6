"""How this project's processes run torch's CPU threads (set before torch loads), and the tiers' mixed precision."""

from __future__ import annotations

import os

AUTOCAST_MODES = ("off", "bf16")  # a tier's ``autocast`` setting (shared.runtime.tier gives each its dtype)

# libgomp counts about 100 000 spins a millisecond: 5000 is some 50 microseconds
SPIN_COUNT = "5000"


def sleep_idle_threads() -> None:
    """Idle OpenMP threads spin for a moment, then sleep (``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT=5000``),
    unless the environment already sets the policy; libgomp reads both once, when torch loads it, so call this first.

    A tier mostly waits for its peers, and tiers, benches and other jobs may share cores: a thread that keeps
    spinning while another process needs the core slows that process down (``bench http`` with
    ``OMP_WAIT_POLICY=ACTIVE``: 15 to 19 s a step over HTTP against 3.7 in one process).
    Threads that sleep at once instead pay a wake-up for every parallel region, every small op of a forward:
    4 to 8 % of an idle step. A spin of some 50 microseconds covers the gaps between one op and the next, and
    gives the core back as soon as a tier waits (``docs/performance-log.md``). OpenMP runtimes other than libgomp read
    only the policy. Every ``splitllm`` process sets it, the services and the in-process paths alike, so that
    the benches compare like with like.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
