"""Round metrics from the edges' reports: training loss, held-out quality, bytes per hop."""

from __future__ import annotations

import math
from typing import Any

from shared.http.metrics import ByteLedger
from shared.protocol.messages import Report, as_number


def train_metrics(chosen: list[str], per_user: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean of the users' training losses, and every user's own metrics."""
    losses = [as_number(per_user[u].get("train_loss"), f"{u}'s train_loss") for u in chosen if u in per_user]
    return {"train_loss": sum(losses) / max(len(losses), 1), "users": dict(sorted(per_user.items()))}


def eval_metrics(task: str, reports: dict[str, Report]) -> dict[str, Any]:
    """Held-out loss over every token or example the users evaluated; accuracy, or perplexity for a language model."""
    loss_sum = count = correct = 0.0
    for report in reports.values():
        for user, m in report.metrics.items():
            loss_sum += as_number(m.get("loss_sum"), f"{user}'s loss_sum")
            count += as_number(m.get("count"), f"{user}'s count")
            correct += as_number(m.get("correct"), f"{user}'s correct")
    eval_loss = loss_sum / max(count, 1)
    out: dict[str, Any] = {"eval_loss": eval_loss}
    if task == "cls":
        out["eval_accuracy"] = correct / max(count, 1)
    else:
        out["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
        out["eval_token_accuracy"] = correct / max(count, 1)
    return out


def hop_bytes(reports: dict[str, Report], ledger: ByteLedger | None, key: tuple[int, str]) -> dict[str, Any]:
    """Bytes per hop: user-edge as the edges measured it, edge-cloud from the cloud's own ledger."""
    out = {"user_edge": {"up": 0, "down": 0}, "edge_cloud": {"up": 0, "down": 0}}
    for report in reports.values():
        for d in ("up", "down"):
            out["user_edge"][d] += int((report.bytes or {}).get(d, 0))
    if ledger is not None and reports:
        out["edge_cloud"] = ledger.get(key)
    return out
