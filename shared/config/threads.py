"""How this project's processes run torch's CPU threads: set before torch loads."""

from __future__ import annotations

import os


def sleep_idle_threads() -> None:
    """Idle OpenMP threads sleep at once instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless the
    environment already sets it; libgomp reads it once, when torch loads it, so call this first).

    A tier mostly waits for its peers, and tiers, benches and other jobs may share cores: a thread that
    spins while another process needs the core slows that process down (an in-process round of
    smollm2-135m went from 3.6 s to 11-34 s a step while another job ran). Sleeping costs a wake-up per
    parallel region instead: 2-4 % of an idle in-process step (README "Performance"). Every ``splitllm``
    process sets it, the services and the in-process paths alike, so that the benches compare like with like.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
