"""Several sessions of one tier stepping at once, on threads of one process, against the same steps one after the other.

A tier serves its users from ``--copies`` copies of its blocks that share the frozen weights
(``shared.runtime.copies``): a session's forward binds its adapters onto a copy it holds alone, and its backward and
update run without one (``shared.runtime.tier.TierRuntime``). With one copy, sessions' forwards take turns and the
rest of their steps can run beside each other. This bench measures how much of a step that leaves to run at once:
with the cores to spare, ``sessions`` sessions at once take ``serial / sessions`` of the time one after the other
when nothing waits for a copy, and all of it when everything does. ``locked_share`` is the part of the steps one
after the other that held a copy, so ``speedup_bound`` (``sessions``, or ``copies`` / that share where it is less) is
the most the copies let sessions at once gain. Every thread runs torch on one thread
of its own (``torch.set_num_threads(1)``), as the services' compute does by default, so the sessions are the only
parallelism; ``--sessions`` at most the machine's cores measures the copies, more measures the cores too.

Each step is a training step on random rows: the tier's forward; at the head's tier the task's loss (a language
model's logits a chunk of positions at a time) and its backward; at a tier without the head (the edge, the user) a
backward of a gradient of ones; then the update. With ``--evaluate`` each is a held-out batch instead: the forward, and
at the head's tier the head's counts (a language model's a chunk of positions at a time), all of it but the counts
on a copy of the blocks, as a round's evaluation runs.

    splitllm bench sessions --model smollm2-135m --split 2,15 --batch-size 4 --seq-len 128 --steps 4 --copies 2 \
        --json runs/bench_sessions.json
"""

from __future__ import annotations

import argparse
import threading
import time
from functools import partial
from typing import Any


def bench_sessions(model: str, split: str, tier: str, sessions: int, batch_size: int, seq_len: int, steps: int,
                   seed: int = 0, copies: int = 1, evaluate: bool = False) -> dict[str, Any]:
    """Seconds of ``sessions`` x ``steps`` training steps at ``tier``: each session's steps after the previous
    session's (``serial_s``), then every session's at once on a thread of its own (``concurrent_s``)."""
    import torch

    from shared.config.deployment import ModelSpec
    from shared.http.metrics import resident_memory_bytes
    from shared.lab.bench.timing import Machine
    from shared.model.adapters import initial_state
    from shared.model.partition import Split
    from shared.model.sources import resolve_model
    from shared.protocol.enums import Mode
    from shared.protocol.messages import RoundPlan
    from shared.runtime.loss import head_counts, head_loss, label_count
    from shared.runtime.tier import TierRuntime

    torch.set_num_threads(1)
    source = resolve_model(model)
    task = "lm" if "lm" in source.family.tasks else "cls"
    layers = Split.parse(split, source.num_layers)
    spec = ModelSpec(model, (layers.a, layers.b), task, num_labels=0 if task == "lm" else 6)
    runtime = TierRuntime(tier, source, spec, copies=copies)
    held_copies, loaded = runtime.copies, resident_memory_bytes()
    plans = [RoundPlan(round_id=1, user_id=f"user-{i}", local_steps=steps, batch_size=batch_size, lr=1e-4, seed=seed,
                       mode=Mode.EVAL if evaluate else Mode.TRAIN) for i in range(sessions)]
    state = initial_state(runtime.slots.shapes(), seed)
    opened = [runtime.open_session(plan, state) for plan in plans]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, seq_len, runtime.width, generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.int64)
    classes = runtime.step_limits(opened[0]).classes
    labels = torch.randint(0, classes, (batch_size, seq_len) if task == "lm" else (batch_size,), generator=g)
    has_head = runtime.variant(plans[0]).head is not None
    loss_of = partial(head_loss, task, labels=labels, count=label_count(task, labels))

    def step(session: Any) -> None:
        inputs = hidden.clone().requires_grad_(not evaluate)
        out = runtime.forward(session, inputs, mask, 0)
        if evaluate:  # a held-out batch: the forward, and the head's counts where it runs
            if has_head:
                runtime.head(session, out, mask, partial(head_counts, task, labels=labels))
            return
        if has_head:
            runtime.backward(session, [runtime.head(session, out, mask, loss_of)], [None])
        else:
            runtime.backward(session, [out], [torch.ones_like(out)])
        runtime.step(session)

    def run(session: Any) -> None:
        for _ in range(steps):
            step(session)

    for session in opened:  # a first step each: the process's first allocations, the optimizers' state
        step(session)
    with Machine() as machine:
        started = time.perf_counter()
        held = held_copies.held_s
        for session in opened:
            run(session)
        serial, held = time.perf_counter() - started, held_copies.held_s - held
        threads = [threading.Thread(target=run, args=(session,)) for session in opened]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent = time.perf_counter() - started
    return {"model": model, "split": split, "tier": tier, "task": task, "head": has_head, "sessions": sessions,
            "mode": "eval" if evaluate else "train",
            "batch": [batch_size, seq_len], "steps_each": steps, "serial_s": serial, "concurrent_s": concurrent,
            "speedup": serial / concurrent, "step_s_serial": serial / (sessions * steps),
            "copies": held_copies.count, "resident_mb_loaded": loaded / 1e6, "locked_share": held / serial,
            "speedup_bound": min(sessions, held_copies.count * serial / held) if held else float(sessions),
            "machine": machine.record}


def main(argv: list[str] | None = None) -> int:
    from shared.lab.bench.timing import write_json

    p = argparse.ArgumentParser(prog="splitllm bench sessions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", default="2,15")
    p.add_argument("--tier", default="cloud", choices=("user", "edge", "cloud"))
    p.add_argument("--sessions", type=int, default=2, help="sessions stepping at once (default 2: this machine's cores)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps of each session (after one untimed)")
    p.add_argument("--copies", type=int, default=1, help="copies of the tier's blocks (the services' block_copies)")
    p.add_argument("--evaluate", action="store_true", help="held-out batches (forward only) instead of training steps")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if min(args.sessions, args.steps, args.copies) < 1:
        p.error("--sessions, --steps and --copies must be at least 1")
    r = bench_sessions(args.model, args.split, args.tier, args.sessions, args.batch_size, args.seq_len, args.steps,
                       copies=args.copies, evaluate=args.evaluate)
    r["command"] = "splitllm bench sessions " + " ".join(argv if argv is not None else [])
    print(f"{r['model']} {r['split']}, {r['tier']} tier ({'with' if r['head'] else 'without'} the head), "
          f"{r['sessions']} sessions x {r['steps_each']} steps of {r['batch'][0]} x {r['batch'][1]}: one after the "
          f"other {r['serial_s']:.1f} s, at once {r['concurrent_s']:.1f} s ({r['speedup']:.2f}x; {r['copies']} "
          f"cop{'y' if r['copies'] == 1 else 'ies'} held {100 * r['locked_share']:.0f} % of the steps, a bound of "
          f"{r['speedup_bound']:.2f}x); "
          f"{r['machine']['cpus']} cores, load {r['machine']['load_before'][0]} -> {r['machine']['load_after'][0]}")
    write_json(r, args.json)
    return 0
