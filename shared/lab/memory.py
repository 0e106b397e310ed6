"""Per-tier memory: parameter bytes and peak resident memory of each tier's own process, against a whole-model one."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any


def _status(pid: int | str = "self") -> dict[str, int]:
    """A process's peak (VmHWM: unlike ru_maxrss, it does not inherit the parent's peak across exec) and its resident
    memory now, anonymous (heap, tensors) and file-backed (libraries' code, memory-mapped weights)."""
    fields = {"VmHWM:": "peak_rss_bytes", "RssAnon:": "rss_anon_bytes", "RssFile:": "rss_file_bytes"}
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name = line.split(":", 1)[0] + ":"
            if name in fields:
                out[fields[name]] = int(line.split()[1]) * 1024
    if pid == "self":  # no VmHWM line: this process's ru_maxrss is the next best (it says nothing of another's)
        out.setdefault("peak_rss_bytes", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024)
    return out


# What a user service imports, in the order it loads them: resident memory after each (``imports`` probe)
IMPORTS = ("torch", "transformers", "transformers.modeling_utils", "peft", "shared.runtime.tier", "user_agent.app")


def probe_imports() -> dict[str, Any]:
    """Resident memory after importing each of ``IMPORTS`` in turn (each includes what the ones before it loaded)."""
    import importlib

    steps = [{"module": "python", **_status()}]
    for name in IMPORTS:
        importlib.import_module(name)
        steps.append({"module": name, **_status()})
    return {"param_bytes": 0, "steps": steps, **_status()}


def probe(model: str, split: tuple[int, int], tier: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    """Load one tier (or the whole model) in this process and run one LoRA training step through it; ``imports``:
    the import steps alone (``probe_imports``)."""
    if tier == "imports":
        return probe_imports()
    import torch

    from shared.config.deployment import ModelSpec
    from shared.model.adapters import LoraSettings
    from shared.model.sources import resolve_model
    from shared.protocol.messages import RoundPlan
    from shared.runtime.tier import TierRuntime

    source = resolve_model(model)
    if tier == "runtime":  # the floor: python, torch, transformers and the tier's code, no weights
        return {"param_bytes": 0, **_status()}
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
        return {"param_bytes": param_bytes, **_status()}
    task = source.family.tasks[0]
    spec = ModelSpec(model=model, split=split, task=task, num_labels=2 if task == "cls" else 0)
    runtime = TierRuntime(tier, source, spec)
    session = runtime.open_session(RoundPlan(round_id=1, user_id="probe", local_steps=1, batch_size=batch_size, lr=1e-3), runtime.global_state_template())
    hidden = None
    if tier != "user":
        hidden = torch.randn(batch_size, seq_len, int(source.config.hidden_size), requires_grad=True)
    out = runtime.forward(session, hidden, mask, 0, input_ids=ids if tier == "user" else None)
    grad = None
    if tier == "cloud":  # the cloud's loss, as its service makes it (a language model's logits a chunk at a time)
        from shared.runtime.loss import head_loss

        labels = ids if task == "lm" else torch.zeros(batch_size, dtype=torch.int64)
        out = runtime.head(session, out, mask, lambda head: head_loss(task, head, labels))
    else:
        grad = torch.ones_like(out)
    if out.requires_grad:
        runtime.backward_and_step(session, [out], [grad])
    return {"param_bytes": runtime.parameter_bytes(), **_status()}


def probe_process(model: str, split: tuple[int, int], tier: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    """``probe`` in a fresh process of its own, so that its peak RSS is that tier's alone."""
    out = subprocess.run(
        [sys.executable, "-m", "shared.lab.memory", model, f"{split[0]},{split[1]}", tier, str(batch_size), str(seq_len)],
        capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {tier} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe_runs(model: str, split: tuple[int, int], tier: str, batch_size: int, seq_len: int,
               repeats: int) -> dict[str, Any]:
    """``probe_process`` ``repeats`` times: the run of the median peak, with every run's peak (``peak_rss_runs_bytes``).

    One process's peak is not the same from run to run: the whole smollm2-135m's fine-tune at 4 x 64 peaks at about
    1360 or about 1515 MB, for a cause not found (``docs/performance-log.md``, "Two runs of ``make perf``")."""
    runs = sorted((probe_process(model, split, tier, batch_size, seq_len) for _ in range(repeats)),
                  key=lambda r: r["peak_rss_bytes"])
    return {**runs[(len(runs) - 1) // 2], "peak_rss_runs_bytes": [r["peak_rss_bytes"] for r in runs]}


def service_peaks(model: str, split: tuple[int, int], batch_size: int, seq_len: int, steps: int = 2) -> dict[str, Any]:
    """The real services: a cloud, an edge and a user as processes (``splitllm cloud|edge|user``), one training round of
    ``steps`` steps on Shakespeare rows of ``seq_len`` tokens; each process's peak and resident memory after it."""
    import tempfile
    from pathlib import Path

    from shared.lab.cluster import Cluster, full_row_args

    cloud_args = full_row_args(model, f"{split[0]},{split[1]}", "shakespeare", seq_len, 4 * batch_size * steps)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), cloud_args, users=1, edges=1)
        try:
            cluster.start()
            view = cluster.run_round({"local_steps": steps, "batch_size": batch_size, "evaluate": False})
            peaks = {name: _status(proc.popen.pid) for name, proc in cluster.procs.items() if proc.popen is not None}
        finally:
            cluster.stop()
    shape = next(iter(view["metrics"]["users"].values())).get("batch_shape")
    return {"steps": steps, "batch_shape": shape, **peaks}


def memory_report(model: str, split: tuple[int, int], batch_size: int = 4, seq_len: int = 64,
                  services: bool = False, steps: int = 2, repeats: int = 3) -> dict[str, Any]:
    """Each tier and the whole model in a fresh process of its own, ``repeats`` times (``probe_runs``), so peak RSS is
    that tier's alone (glibc's malloc as it is: one step); with ``services``, the real service processes too
    (``service_peaks``, a round of ``steps``, once), under the heap policy of this process's environment (``heap``:
    ``shared.config.heap``). ``user_rss_share`` is the medians'; ``user_rss_share_range`` the least and the most it
    can be over the runs (the user's lowest over the whole's highest, its highest over the whole's lowest)."""
    from shared.config.heap import heap_policy
    from shared.model.sources import resolve_model

    resolve_model(model)  # convert / validate once, before the probes race to do it
    report: dict[str, Any] = {"model": model, "split": list(split), "batch_size": batch_size, "seq_len": seq_len,
                              "repeats": repeats}
    for tier in ("user", "edge", "cloud", "whole", "runtime", "imports"):
        report[tier] = probe_runs(model, split, tier, batch_size, seq_len, repeats)
    if services:
        report["services"] = service_peaks(model, split, batch_size, seq_len, steps)
        report["heap"] = heap_policy()
    whole, user = report["whole"], report["user"]
    share = user["param_bytes"] / whole["param_bytes"]
    not_held = whole["param_bytes"] - user["param_bytes"]
    saved = whole["peak_rss_bytes"] - user["peak_rss_bytes"]
    report["user_param_share"] = share
    report["user_rss_share"] = user["peak_rss_bytes"] / whole["peak_rss_bytes"]
    users, wholes = user["peak_rss_runs_bytes"], whole["peak_rss_runs_bytes"]
    report["user_rss_share_range"] = [min(users) / max(wholes), max(users) / min(wholes)]
    report["user_rss_saving_bytes"] = saved
    report["user_bytes_not_held"] = not_held
    report["checks"] = [
        f"user tier holds {share:.1%} of the whole model's parameter bytes (target <= 30%): {'ok' if share <= 0.30 else 'FAIL'}",
        (f"user peak RSS is {report['user_rss_share']:.1%} of the whole model's, medians of {repeats} runs "
        f"({report['user_rss_share_range'][0]:.1%} to {report['user_rss_share_range'][1]:.1%} over them; target <= "
        f"30%; the runtime alone, no weights: {report['runtime']['peak_rss_bytes'] / 1e6:.0f} MB): "
        f"{'ok' if report['user_rss_share_range'][1] <= 0.30 else 'FAIL'}"),
        (f"user peak RSS is {saved / 1e6:.1f} MB below the whole model's; it does not hold {not_held / 1e6:.1f} MB "
        f"of parameters: {'ok' if saved >= not_held else 'FAIL'}"),
    ]
    if services:
        service = report["services"]["user-0"]["peak_rss_bytes"]
        report["user_service_rss_share"] = service / whole["peak_rss_bytes"]
        report["checks"].append(
            f"the user service process (HTTP stack, data, tokenizer; real rows) peaks at {service / 1e6:.0f} MB, "
            f"{report['user_service_rss_share']:.1%} of the whole-model probe's; the user probe: "
            f"{user['peak_rss_bytes'] / 1e6:.0f} MB")
    return report


def print_report(report: dict[str, Any]) -> None:
    """``memory_report``'s figures as the ``splitllm memory`` table, the imports and the checks."""
    whole = report["whole"]
    print(f"{'process':>13}  {'param_MB':>9}  {'share':>6}  {'peak_rss_MB':>11}  {'anon_MB':>7}  {'file_MB':>7}  "
          "(after)  runs' peaks MB")
    rows = [(name, report[name]) for name in ("user", "edge", "cloud", "whole", "runtime")]
    rows += [(f"service {name}", r) for name, r in report.get("services", {}).items() if isinstance(r, dict)]
    for name, r in rows:
        params = r.get("param_bytes")
        mb, share = ("", "") if params is None else (f"{params / 1e6:.1f}", f"{params / whole['param_bytes']:.1%}")
        print(f"{name:>13}  {mb:>9}  {share:>6}  {r['peak_rss_bytes'] / 1e6:>11.1f}  "
              f"{r.get('rss_anon_bytes', 0) / 1e6:>7.1f}  {r.get('rss_file_bytes', 0) / 1e6:>7.1f}           "
              + " ".join(f"{x / 1e6:.0f}" for x in r.get("peak_rss_runs_bytes", [])))
    print("resident after importing: " + ", ".join(f"{step['module']} {step['peak_rss_bytes'] / 1e6:.0f} MB"
                                                   for step in report["imports"]["steps"]))
    for line in report["checks"]:
        print(line)


if __name__ == "__main__":
    _model, _split, _tier, _bs, _seq = sys.argv[1:6]
    _a, _b = (int(x) for x in _split.split(","))
    print(json.dumps(probe(_model, (_a, _b), _tier, int(_bs), int(_seq))))
