"""Round metrics from the edges' reports: training loss, held-out quality, bytes per hop."""

from __future__ import annotations

import math
import statistics
from typing import Any

from shared.http.metrics import ByteLedger
from shared.protocol.fields import as_number
from shared.protocol.messages import Report


LOSS_FLAG_FACTOR = 10.0  # with 3 or more users, a training loss over this many times their median is flagged


def train_metrics(chosen: list[str], per_user: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean of the users' training losses, and every user's own metrics.

    Losses are self-reported: with 3 or more users, one over ``LOSS_FLAG_FACTOR`` times the median (or
    not a finite non-negative number) is flagged and left out of the mean.
    """
    losses = {u: per_user[u].get("train_loss") for u in chosen if u in per_user}
    flagged: dict[str, str] = {}
    for u, loss in losses.items():
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
            flagged[u] = f"train_loss {str(loss)[:40]} is not a finite non-negative number"
    usable = {u: float(v) for u, v in losses.items() if u not in flagged}
    if len(usable) >= 3:
        median = statistics.median(usable.values())
        for u, loss in usable.items():
            if loss > LOSS_FLAG_FACTOR * median:
                flagged[u] = f"train_loss {loss:.4g} is over {LOSS_FLAG_FACTOR:g} times the median {median:.4g}"
    kept = [v for u, v in usable.items() if u not in flagged]
    out: dict[str, Any] = {"train_loss": sum(kept) / max(len(kept), 1), "users": dict(sorted(per_user.items()))}
    if flagged:
        out["flagged"] = flagged
    return out


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


def drop_reasons(reports: dict[str, Report], chosen: list[str]) -> dict[str, str]:
    """Why each chosen user that did not report was dropped: as its edge said, or its edge never reported."""
    reasons = {u: r for report in reports.values() for u, r in report.reasons.items()}
    reported = {u for report in reports.values() for u in (*report.metrics, *report.missing)}
    reasons.update({u: "its edge did not report" for u in chosen if u not in reported})
    return dict(sorted(reasons.items()))
