"""Benchmark that writes JSON: one user's step with and without micro-batch pipelining over an emulated link.

Real processes on loopback (a cloud, an edge, one user whose link to the edge runs the profile). One
cluster runs rounds alternately unpipelined (``micro_batches`` 1) and pipelined, so that a change in
the machine's load hits both; a step's time is the median over the rounds' steps, each round's first
step left out. Rows are full length (questions of one class joined, then truncated), so every step
carries batch x seq_len tokens.

What bounds the pipelined step: the link carries one message's bytes at a time each way
(``shared.protocol.links``), so the step's activations still take bytes / uplink rate in all; what the
pipeline overlaps is compute with the link, the two directions with each other, and latency. The
``link_floor`` is that bound: the step's bytes up at the uplink rate, the last micro-batch's gradient
down, one round trip of delay.

It also measures the fixed cost of one more request on a hop (``request_overhead``): a small signed step
message to the edge, answered 404 (no such session) after the edge has checked its signature and read,
decoded and parsed it. That is what sending each micro-batch as a request of its own costs over
streaming them on one request, per micro-batch and hop.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shared.config.round import RoundConfig
from shared.http.client import HttpLink, Identity, TransportError
from shared.http.credentials import Credential
from shared.lab.bench.timing import Machine, cpu_seconds
from shared.lab.cluster import Cluster, full_row_args
from shared.protocol.enums import Mode
from shared.protocol.links import get_profile
from shared.protocol.messages import StepRequest


def data_args(model: str, split: str, batch_size: int, seq_len: int, steps: int, seed: int = 0) -> list[str]:
    """Cloud flags for full-length rows of a classification set (minilm) or Shakespeare (a decoder)."""
    from shared.model.sources import resolve_model

    data = "shakespeare" if "lm" in resolve_model(model).family.tasks else "trec"
    return full_row_args(model, split, data, seq_len, 16 * steps * batch_size, seed)


def user_steps(view: dict[str, Any]) -> dict[str, list[float]]:
    """Each user's step seconds in a finished round's view."""
    return {user: list(m["step_seconds"]) for user, m in view["metrics"]["users"].items()}


def request_overhead(cluster: Cluster, count: int = 40) -> dict[str, float]:
    """Seconds of one small signed step request to the edge and its 404, median over ``count`` (after 5 to warm up)."""
    credential = Credential.load(cluster.workdir / "credentials" / "user-0.json")
    edge = cluster.procs["edge-0"]
    spec = HttpLink(edge.url, upward=True, identity=Identity(credential=credential), audience="edge", retry_deadline=5)
    edge_id = spec.client.get("/v1/spec").json()["edge_id"]
    spec.close()
    link = HttpLink(edge.url, upward=True, identity=Identity(credential=credential), audience=f"edge:{edge_id}",
                    retry_deadline=5)
    msg = StepRequest(10**6, "user-0", 0, Mode.TRAIN, torch.zeros(4, 8), torch.ones(1, 4, dtype=torch.uint8),
                      torch.zeros(1, 4, dtype=torch.int64)).to_message()
    times = []
    try:
        for i in range(count + 5):
            t0 = time.perf_counter()
            try:
                link.request("step", msg)
            except TransportError as exc:
                if exc.status != 404:
                    raise
            if i >= 5:
                times.append(time.perf_counter() - t0)
    finally:
        link.close()
    return {"median_s": statistics.median(times), "min_s": min(times), "requests": count}


def link_floor(profile: str, up_bytes: float, down_bytes: float, micro_batches: int) -> float:
    """The least a step can take on the link: its bytes up at the uplink rate, the last micro-batch's gradient down,
    one round trip of delay."""
    p = get_profile(profile)
    return up_bytes * 8 / (p.up_mbps * 1e6) + down_bytes / micro_batches * 8 / (p.down_mbps * 1e6) + 2 * p.delay_ms / 1e3


def bench_pipeline(model: str = "minilm-l6", split: str = "1,3", batch_size: int = 16, seq_len: int = 128,
                   micro_batches: int = 4, profile: str = "4g", steps: int = 6, repeats: int = 2,
                   codecs: tuple[str, ...] = ("fp32", "int8"), threads: int = 0) -> dict[str, Any]:
    """One user's step time over ``profile``, unpipelined and in ``micro_batches`` micro-batches, per codec."""
    import os

    RoundConfig(batch_size=batch_size, micro_batches=micro_batches)  # refuse bad settings before starting anything
    env = {**os.environ, "SPLITLLM_THREADS": str(threads)}
    out: dict[str, Any] = {"model": model, "split": split, "batch": [batch_size, seq_len], "profile": profile,
                           "micro_batches": micro_batches, "steps": steps, "repeats": repeats, "threads": threads,
                           "codecs": {}}
    for codec in codecs:
        with tempfile.TemporaryDirectory() as tmp:
            cluster = Cluster(Path(tmp), [*data_args(model, split, batch_size, seq_len, steps),
                                          "--user-edge-codecs", codec], users=1, edges=1,
                              user_args=["--link-profile", profile], env=env)
            try:
                cluster.start()
                overhead = request_overhead(cluster)
                times: dict[int, list[float]] = {1: [], micro_batches: []}
                cpu: dict[int, list[float]] = {1: [], micro_batches: []}
                bytes_per_step: dict[int, dict[str, float]] = {}
                pids = [p.popen.pid for p in cluster.procs.values()]
                with Machine() as machine:
                    for _ in range(repeats):
                        for m in (1, micro_batches):
                            cpu0 = sum(cpu_seconds(pid) for pid in pids)
                            view = cluster.run_round({"local_steps": steps, "batch_size": batch_size,
                                                      "micro_batches": m, "evaluate": False})
                            cpu[m].append((sum(cpu_seconds(pid) for pid in pids) - cpu0) / steps)
                            times[m] += user_steps(view)["user-0"][1:]
                            hop = view["metrics"]["bytes"]["user_edge"]
                            bytes_per_step[m] = {"up": hop["up"] / steps, "down": hop["down"] / steps}
            finally:
                cluster.stop()
        whole, piped = (statistics.median(times[m]) for m in (1, micro_batches))
        up, down = bytes_per_step[micro_batches]["up"], bytes_per_step[micro_batches]["down"]
        floor = link_floor(profile, up, down, micro_batches)
        out["codecs"][codec] = {
            "unpipelined_step_s": whole, "pipelined_step_s": piped, "ratio": piped / whole,
            "step_seconds": {str(m): t for m, t in times.items()}, "bytes_per_step": bytes_per_step,
            "cpu_seconds_per_step": {str(m): statistics.median(c) for m, c in cpu.items()},
            "link_floor_s": floor, "link_floor_ratio": floor / whole,
            "request_overhead": overhead,
            "extra_requests_per_step": 2 * (micro_batches - 1),  # per hop on the way to the cloud, one more each
            "extra_request_share": 2 * (micro_batches - 1) * overhead["median_s"] / piped,
            "machine": machine.record,
        }
    return out


def summary(report: dict[str, Any]) -> list[str]:
    lines = [(f"{report['model']} batch {report['batch']} over {report['profile']}, {report['micro_batches']} "
              f"micro-batches against 1 ({report['steps']} steps x {report['repeats']} rounds each):")]
    for codec, r in report["codecs"].items():
        lines.append(f"  {codec:>5}: unpipelined {r['unpipelined_step_s']:.2f} s/step, pipelined {r['pipelined_step_s']:.2f}"
                     f" s/step, ratio {r['ratio']:.2f} (target <= 0.6; the link's floor {r['link_floor_s']:.2f} s = "
                     f"{r['link_floor_ratio']:.2f}); one more request costs {r['request_overhead']['median_s'] * 1e3:.1f} ms "
                     f"({r['extra_request_share']:.1%} of the pipelined step); load {r['machine']['load_before']}"
                     f" -> {r['machine']['load_after']}; CPU seconds per step of all three processes "
                     f"{r['cpu_seconds_per_step']['1']:.2f} unpipelined, "
                     f"{r['cpu_seconds_per_step'][str(report['micro_batches'])]:.2f} pipelined")
    return lines


def bench_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The flags the timed round benches share: model, split, batch, the pipelined setting, --json."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--split", default="1,3")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=4, help="the pipelined setting, run beside 1")
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    from shared.lab.bench.timing import write_json

    p = bench_parser("splitllm bench pipeline", __doc__)
    p.add_argument("--profile", default="4g", help="the user's link to its edge (wifi, 4g, 5g, fiber)")
    p.add_argument("--steps", type=int, default=6, help="steps per round (the first of each is left out)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of each setting, alternating")
    p.add_argument("--codec", action="append", default=None, help="user-edge codecs to run (default: fp32 and int8)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every tier (0: one per core)")
    p.add_argument("--quick", action="store_true", help="fp32 only, 3 steps, one round of each")
    args = p.parse_args(argv)
    codecs = tuple(args.codec or (("fp32",) if args.quick else ("fp32", "int8")))
    steps, repeats = (3, 1) if args.quick else (args.steps, args.repeats)
    report = bench_pipeline(args.model, args.split, args.batch_size, args.seq_len, args.micro_batches, args.profile,
                            steps, repeats, codecs, args.threads)
    report["command"] = "splitllm bench pipeline " + " ".join(argv if argv is not None else [])
    print("\n".join(summary(report)))
    write_json(report, args.json)
    return 0
