"""Round metrics from the edges' reports: training loss, held-out quality, bytes per hop."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from typing import Any

from shared.errors import InvalidInput
from shared.http.metrics import ByteLedger
from shared.protocol.fields import as_number
from shared.protocol.messages import Report
from shared.runtime.tier import TierRuntime

log = logging.getLogger("splitllm.rounds")


LOSS_FLAG_FACTOR = 10.0  # with 3 or more users, a training loss over this many times their median is flagged


def train_metrics(chosen: list[str], per_user: dict[str, dict[str, Any]],
                  cloud: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The mean of the users' training losses, every user's own metrics, and each tier's compute (``compute_metrics``,
    given the cloud's own per user).

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
    if cloud is not None:
        out.update(compute_metrics(per_user, cloud))
    return out


def compute_metrics(per_user: dict[str, dict[str, Any]], cloud: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each tier's training compute in the round: seconds summed over the users (the user tier's as the devices
    report them, with their slowdown), and blocks run per step, averaged over the users.

    The user tier's figures are self-reported (anything but a finite non-negative number counts as 0); the
    edge's come from the edge, which overwrites any a user sends; the cloud's are its own. Each tier's blocks are
    per its own steps where it counted them, so a user's step count moves only the user tier's figure.
    """
    seconds = {"user": 0.0, "edge": 0.0, "cloud": 0.0}
    blocks: dict[str, list[float]] = {"user": [], "edge": [], "cloud": []}
    for user, m in per_user.items():
        steps = {"user": m.get("steps"), "edge": m.get("edge_steps", m.get("steps"))}
        for tier in ("user", "edge"):
            seconds[tier] += _count(m.get(f"{tier}_compute_seconds"))
            blocks[tier].append(_count(m.get(f"{tier}_blocks_run")) / max(_count(steps[tier]), 1.0))
        if user in cloud:
            seconds["cloud"] += cloud[user]["seconds"]
            blocks["cloud"].append(cloud[user]["blocks_run"] / max(cloud[user].get("steps", 1), 1))
    per_step = {t: sum(v) / len(v) if v else 0.0 for t, v in blocks.items()}
    return {"compute_seconds": seconds, "blocks_per_step": per_step}


def _count(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


def own_held_out(reports: dict[str, Report], round_id: int, runtime_of: Callable[[str], TierRuntime]) -> None:
    """An evaluation's reports, each user's held-out sums made the cloud's own: those its head computed for the user's
    eval steps, whatever the edge relayed; in a U-shaped chain, where the user scores itself, its own if they can be
    (``shared.runtime.session.HeldOut.sums``). A user whose sums cannot be is left out, the reason among its edge's."""
    for report in reports.values():
        for user, claimed in list(report.metrics.items()):
            runtime = runtime_of(user)
            session = runtime.sessions.get((round_id, user))
            try:
                if session is None:
                    raise InvalidInput(f"user {user} has no evaluation session at the cloud")
                claimed.update(session.held_out.sums(claimed, f"user {user}", runtime.serves(session.plan)))
            except InvalidInput as exc:
                log.warning("round %s: the evaluation of %s is left out: %s", round_id, user, exc)
                del report.metrics[user]
                report.reasons[user] = str(exc)


def eval_metrics(reports: dict[str, Report], task_of: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Held-out loss over every token or example the users evaluated; accuracy, or perplexity for a language model.

    ``task_of`` maps each user to its (task name, ``cls`` or ``lm``). With several tasks, ``tasks`` holds each
    one's own metrics, and the overall figures pool the tasks of the first one's kind. ``eval_drop_reasons``: why
    each user left out of the evaluation was, as its edge or the cloud said.
    """
    per_user = {u: m for report in reports.values() for u, m in report.metrics.items()}
    names = sorted({task_of[u][0] for u in per_user}) or [""]
    kind = next((task_of[u][1] for u in per_user), "cls")
    out = _pooled(kind, {u: m for u, m in per_user.items() if task_of[u][1] == kind})
    if len(names) > 1:
        out["tasks"] = {name: _pooled(next(k for n, k in task_of.values() if n == name),
                                      {u: m for u, m in per_user.items() if task_of[u][0] == name}) for name in names}
    if reasons := {u: r for report in reports.values() for u, r in report.reasons.items()}:
        out["eval_drop_reasons"] = dict(sorted(reasons.items()))
    return out


def _pooled(task: str, per_user: dict[str, dict[str, Any]]) -> dict[str, Any]:
    loss_sum = count = correct = 0.0
    for user, m in per_user.items():
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


def merge_eval(metrics: dict[str, Any], held_out: dict[str, Any], eval_bytes: dict[str, Any]) -> None:
    """A round's evaluation into its metrics: the held-out figures, and its bytes, added to the round's
    ``bytes`` (every message of the round) and kept apart as ``eval_bytes``."""
    metrics.update(held_out)
    metrics["eval_bytes"] = eval_bytes
    for hop, counts in eval_bytes.items():
        for d, n in counts.items():
            metrics["bytes"][hop][d] += n


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
