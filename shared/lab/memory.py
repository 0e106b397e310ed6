"""Per-tier memory: parameter bytes and peak resident memory of each tier's own process, against a whole-model one."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

import torch


def _peak_rss_bytes() -> int:
    """This process's own peak (VmHWM): unlike ru_maxrss, it does not inherit the parent's peak across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def probe(model: str, split: tuple[int, int], tier: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    """Load one tier (or the whole model) in this process and run one LoRA training step through it."""
    from shared.config.deployment import ModelSpec
    from shared.model.adapters import LoraSettings
    from shared.model.sources import resolve_model
    from shared.protocol.messages import RoundPlan
    from shared.runtime.tier import TierRuntime

    source = resolve_model(model)
    if tier == "runtime":  # the floor: python, torch, transformers and the tier's code, no weights
        return {"param_bytes": 0, "peak_rss_bytes": _peak_rss_bytes()}
    ids = torch.randint(0, int(source.config.vocab_size), (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if tier == "whole":
        from peft import get_peft_model

        from shared.lab.verify import whole_model
        from shared.model.adapters import peft_config

        task = source.family.tasks[0]
        whole = get_peft_model(whole_model(source, task, 2), peft_config(LoraSettings(), source.family))
        param_bytes = sum(p.numel() * p.element_size() for p in whole.get_base_model().parameters())
        labels = ids.clone() if task == "lm" else torch.zeros(batch_size, dtype=torch.int64)
        whole(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {"param_bytes": param_bytes, "peak_rss_bytes": _peak_rss_bytes()}
    task = source.family.tasks[0]
    spec = ModelSpec(model=model, split=split, task=task, num_labels=2 if task == "cls" else 0)
    runtime = TierRuntime(tier, source, spec)
    session = runtime.open_session(RoundPlan(round_id=1, user_id="probe", local_steps=1, batch_size=batch_size, lr=1e-3), runtime.global_state_template())
    hidden = None
    if tier != "user":
        hidden = torch.randn(batch_size, seq_len, int(source.config.hidden_size), requires_grad=True)
    out = runtime.forward(session, hidden, mask, 0, input_ids=ids if tier == "user" else None)
    if tier == "cloud":
        out = runtime.head(session, out, mask)
    if out.requires_grad:
        runtime.backward_and_step(session, [out], [torch.ones_like(out)])
    return {"param_bytes": runtime.parameter_bytes(), "peak_rss_bytes": _peak_rss_bytes()}


def probe_process(model: str, split: tuple[int, int], tier: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    """``probe`` in a fresh process of its own, so that its peak RSS is that tier's alone."""
    out = subprocess.run(
        [sys.executable, "-m", "shared.lab.memory", model, f"{split[0]},{split[1]}", tier, str(batch_size), str(seq_len)],
        capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {tier} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_report(model: str, split: tuple[int, int], batch_size: int = 4, seq_len: int = 64) -> dict[str, Any]:
    """Each tier and the whole model in a fresh process of its own, so peak RSS is that tier's alone."""
    from shared.model.sources import resolve_model

    resolve_model(model)  # convert / validate once, before the probes race to do it
    report: dict[str, Any] = {"model": model, "split": list(split), "batch_size": batch_size, "seq_len": seq_len}
    for tier in ("user", "edge", "cloud", "whole", "runtime"):
        report[tier] = probe_process(model, split, tier, batch_size, seq_len)
    whole, user = report["whole"], report["user"]
    share = user["param_bytes"] / whole["param_bytes"]
    not_held = whole["param_bytes"] - user["param_bytes"]
    saved = whole["peak_rss_bytes"] - user["peak_rss_bytes"]
    report["user_param_share"] = share
    report["user_rss_share"] = user["peak_rss_bytes"] / whole["peak_rss_bytes"]
    report["user_rss_saving_bytes"] = saved
    report["user_bytes_not_held"] = not_held
    report["checks"] = [
        f"user tier holds {share:.1%} of the whole model's parameter bytes (target <= 30%): {'ok' if share <= 0.30 else 'FAIL'}",
        (f"user peak RSS is {report['user_rss_share']:.1%} of the whole model's (target <= 30%; the runtime alone, "
        f"no weights: {report['runtime']['peak_rss_bytes'] / 1e6:.0f} MB): "
        f"{'ok' if report['user_rss_share'] <= 0.30 else 'FAIL'}"),
        (f"user peak RSS is {saved / 1e6:.1f} MB below the whole model's; it does not hold {not_held / 1e6:.1f} MB "
        f"of parameters: {'ok' if saved >= not_held else 'FAIL'}"),
    ]
    return report


if __name__ == "__main__":
    _model, _split, _tier, _bs, _seq = sys.argv[1:6]
    _a, _b = (int(x) for x in _split.split(","))
    print(json.dumps(probe(_model, (_a, _b), _tier, int(_bs), int(_seq))))
