"""Benchmark that writes JSON: a tier's resident memory under concurrent maximum-size step bodies, and after them.

A real cloud and a real edge run as processes on loopback. The bench sends the edge ``bodies`` step messages at
once, each as large as the edge accepts: a valid ``StepRequest`` (raw fp32 ``hidden`` rows of the model's width,
its uint8 mask, int64 labels) whose encoded body is just under ``max_message_bytes``. The edge reads and decodes
each one in full, then answers 404 (no such session): what is measured is what a body costs the tier up to its
handler, which users holding credentials of the deployment can make it pay. One caller may hold only half of
the tier's budget of bodies in flight, so the bench holds a credential per concurrent body: users
``memory-bench-0``, ``memory-bench-1``, ... issued with the test cluster's deployment key, each signing its
request afresh.

Memory is taken over the edge's idle memory (after one small warm-up step), as a multiple of the burst's
total body bytes. The peak is the larger of two readings: the kernel's high-water mark of its resident
memory (``VmHWM``, reset through ``/proc/<pid>/clear_refs`` before each burst) and its anonymous resident
memory (``RssAnon`` + ``RssShmem``, sampled every 5 ms during the burst). "After" is its anonymous resident
memory once every reply is in and ``settle`` seconds have passed: on a machine short of memory the kernel
may drop file-backed pages (the libraries' code), which would make the total look released when it is not,
or lower than idle. Linux only.

``splitllm bench memory-bodies [--json PATH]`` runs it.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from shared.http.credentials import Credential, issue, load_private_key
from shared.lab.cluster import Cluster
from shared.protocol.enums import Mode
from shared.protocol.messages import StepRequest
from shared.protocol.wire import CONTENT_TYPE, encode

MiB = 1 << 20
USER = "memory-bench"  # the bench's users are memory-bench-<i>: they sign their steps, have no session at the edge


def step_body(width: int, max_bytes: int, max_elements: int, batch: int = 1024, seed: int = 0,
              user: str = USER) -> bytes:
    """The largest valid step body of ``user`` under ``max_bytes``: ``hidden`` raw fp32 (random, so incompressible)."""
    overhead, labels = 4096, 8 * batch  # envelope, meta, entry fields; int64 labels
    # tokens rows of 4 * width bytes, and a batch x ceil(tokens / batch) uint8 mask (at most tokens + batch bytes)
    tokens = min((max_bytes - overhead - labels - batch) // (4 * width + 1), max_elements // width)
    seq = -(-tokens // batch)
    mask = torch.zeros(batch * seq, dtype=torch.uint8)
    mask[:tokens] = 1
    g = torch.Generator().manual_seed(seed)
    request = StepRequest(round=10**6, user=user, step=0, mode=Mode.TRAIN,
                          hidden=torch.randn(tokens, width, generator=g), attention_mask=mask.view(batch, seq),
                          labels=torch.zeros(batch, dtype=torch.int64))
    body = encode(request.to_message(), codec="raw")
    if len(body) > max_bytes:
        raise ValueError(f"step body of {len(body)} bytes over the limit of {max_bytes}")
    return body


def proc_memory(pid: int) -> dict[str, int]:
    """Resident memory of process ``pid`` in bytes: now (``VmRSS``), at its peak (``VmHWM``), and its anonymous
    part (``RssAnon`` + ``RssShmem``: private and shared anonymous memory, all but the files' pages)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"], "anon": fields["RssAnon"] + fields["RssShmem"]}


def reset_peak(pid: int) -> None:
    """Reset the kernel's resident high-water mark of ``pid`` to its current resident memory."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass(frozen=True)
class Signer:
    """The bench's user, posting steps to one edge: each request signed afresh for that edge."""

    credential: Credential
    edge_url: str
    edge_id: str
    path: str = "/v1/step"

    @property
    def url(self) -> str:
        return f"{self.edge_url}{self.path}"

    def headers(self, body: bytes) -> dict[str, str]:
        return {"content-type": CONTENT_TYPE, **self.credential.sign("POST", self.path, f"edge:{self.edge_id}", body)}


def _post(client: httpx.Client, url: str, headers: dict[str, str], content: Any) -> dict[str, Any]:
    """POST ``content`` (bytes, or an iterator of chunks: sent chunked); the reply's status, Retry-After, detail."""
    try:
        r = client.post(url, content=content, headers=headers)
    except httpx.HTTPError as exc:  # a server that answered early may close the connection under the upload
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
            "detail": r.json().get("detail") if r.content else None}


def _burst(posts: list[tuple[Signer, bytes]]) -> list[dict[str, Any]]:
    """POST each body, signed by its user (one caller per body), to the edge at once from a thread each;
    the replies."""
    replies: list[dict[str, Any]] = [{} for _ in posts]
    start = threading.Barrier(len(posts))

    def send(i: int) -> None:
        signer, body = posts[i]
        headers = signer.headers(body)  # before the barrier: the bodies go at once
        with httpx.Client(timeout=600) as client:
            start.wait()
            replies[i] = _post(client, signer.url, headers, body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(posts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def _measured(pid: int, idle: dict[str, int], total: int, settle: float, send: Any) -> dict[str, Any]:
    """Run ``send()``; the edge's peak and after-release memory over ``idle`` (see the module doc), in bytes and
    as ratios to ``total``."""
    before = proc_memory(pid)
    reset_peak(pid)
    done, anon_peak = threading.Event(), [before["anon"]]

    def sample() -> None:
        while not done.wait(0.005):
            anon_peak[0] = max(anon_peak[0], proc_memory(pid)["anon"])

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        replies = send()
    finally:
        done.set()
        sampler.join()
    peak = proc_memory(pid)["peak"]
    time.sleep(settle)
    after = proc_memory(pid)
    growth = max(peak - idle["rss"], anon_peak[0] - idle["anon"])
    return {"before": before, "peak_rss": peak, "peak_anon": anon_peak[0], "after": after,
            "peak_over_idle": growth / total, "after_over_idle": (after["anon"] - idle["anon"]) / total,
            "statuses": sorted(r["status"] or 0 for r in replies), "replies": replies}


def bench_memory_bodies(model: str = "tiny-bert", split: str = "1,3", bodies: int = 4,
                        max_message_bytes: int = 256 * MiB, bursts: int = 3, settle: float = 2.0) -> dict[str, Any]:
    """The edge's resident memory under ``bursts`` bursts of ``bodies`` concurrent maximum-size step bodies (see
    the module doc), then under one burst of ``bodies + 1`` (the budget's default of 4 bodies answers the extra
    one 503), then under one chunked body 1.25 x the limit (413 once past it). Ratios are to ``bodies`` bodies'
    total bytes, the chunked body's to the limit."""
    from shared.model.sources import resolve_model

    width = int(resolve_model(model).config.hidden_size)
    users = [f"{USER}-{i}" for i in range(bodies + 1)]
    posted = [step_body(width, max_message_bytes, max_elements=64 * MiB, user=u) for u in users]
    body = posted[0]
    total = bodies * len(body)
    chunk = b"\0" * MiB
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), ["--model", model, "--split", split, "--data", "trec"], users=0, edges=1,
                          edge_args=["--max-message-bytes", str(max_message_bytes)])
        try:
            cluster.start()
            edge = cluster.procs["edge-0"]
            key = load_private_key(cluster.workdir / "credentials" / "deployment.key")
            signers = [Signer(issue(key, "splitllm", "user", u, 3600.0), edge.url, "edge-0") for u in users]
            signer = signers[0]
            pid = edge.popen.pid
            _burst([(signer, step_body(width, MiB, 64 * MiB, user=users[0]))])  # warm up the route and its threads
            idle = proc_memory(pid)
            posts = list(zip(signers, posted, strict=True))
            runs = [_measured(pid, idle, total, settle, lambda: _burst(posts[:bodies])) for _ in range(bursts)]
            over = _measured(pid, idle, total, settle, lambda: _burst(posts))
            chunks = max_message_bytes * 5 // 4 // MiB
            headers = signer.headers(bytes(chunks * MiB))  # signed as a whole, sent in 1 MiB chunks

            def chunked() -> list[dict[str, Any]]:
                with httpx.Client(timeout=600) as client:
                    return [_post(client, signer.url, headers, (chunk for _ in range(chunks)))]

            over_limit = _measured(pid, idle, max_message_bytes, settle, chunked)
        finally:
            cluster.stop()
    return {"model": model, "tier": "edge", "bodies": bodies, "body_bytes": len(body), "total_body_bytes": total,
            "max_message_bytes": max_message_bytes, "idle": idle, "bursts": runs,
            "peak_ratio": max(r["peak_over_idle"] for r in runs), "target_peak_ratio": 1.5,
            "after_ratio": max(r["after_over_idle"] for r in runs), "over_budget": over,
            "chunked_over_limit": over_limit}
