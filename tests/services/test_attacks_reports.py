"""What a user or an edge says of others' figures: a user's claimed held-out sums, an edge's report of users it was
not started with. The simulator runs the services' code path (the same edge, cloud and round code, every message
encoded), the attacker a device or an edge of it.
"""

from __future__ import annotations

import pytest
import torch

from edge_server.compute import EdgeServer
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.lab.sim import SimConfig, Simulation
from shared.protocol.enums import Mode
from shared.protocol.messages import EvalReply, Report, Update
from shared.runtime.session import HeldOut
from user_agent.compute import UserAgent

LIAR = "user-1"


class Boaster(UserAgent):
    """Evaluates as it should, then claims a billion held-out examples, every one right, at no loss."""

    def evaluate(self, plan, state):  # noqa: ANN001, ANN201
        honest = Update.from_message(super().evaluate(plan, state))
        claimed = {**honest.metrics, "loss_sum": 0.0, "count": 10**9, "correct": 10**9}
        return Update(plan.round_id, self.user_id, Mode.EVAL, honest.num_samples, claimed).to_message()


class Mute(UserAgent):
    """Evaluates as it should, then sends its evaluation update without its sums."""

    def evaluate(self, plan, state):  # noqa: ANN001, ANN201
        honest = Update.from_message(super().evaluate(plan, state))
        return Update(plan.round_id, self.user_id, Mode.EVAL, honest.num_samples, {"examples": 1}).to_message()


def simulation(edges: int = 1, **config: object) -> Simulation:
    return Simulation(SimConfig(model="tiny-bert", data="trec", users=2 * edges, edges=edges, rounds=1, split=(1, 3),
                                round=RoundConfig(local_steps=2, batch_size=4), max_len=16, max_examples_per_client=16,
                                eval_examples_per_client=8, baseline_eval=False, **config))


def round_metrics(sim: Simulation) -> dict:
    record = sim.run_record()
    assert record.state == "committed", record.error
    return record.metrics


def held_out(sim: Simulation) -> dict[str, float]:
    return {k: v for k, v in round_metrics(sim).items() if k in ("eval_loss", "eval_accuracy")}


@pytest.mark.parametrize("liar", [Boaster, Mute])
def test_the_held_out_sums_are_what_the_cloud_computed_not_what_a_user_claims(hermetic_cache, liar) -> None:
    honest = held_out(simulation())
    sim = simulation()
    next(u for u in sim.users if u.user_id == LIAR).__class__ = liar
    assert held_out(sim) == honest
    assert set(honest) == {"eval_loss", "eval_accuracy"} and honest["eval_accuracy"] < 1.0


def test_a_u_shaped_users_own_sums_must_be_possible(hermetic_cache) -> None:
    """U-shaped, the user scores itself: its claim counts, but a billion examples it never sent are refused, and
    the evaluation goes on with the others."""
    sim = simulation(u_shaped=True)
    next(u for u in sim.users if u.user_id == LIAR).__class__ = Boaster
    row = round_metrics(sim)
    assert "held-out sums cannot be" in row["eval_drop_reasons"][LIAR]
    assert 0.0 <= row["eval_accuracy"] <= 1.0 and set(row["eval_drop_reasons"]) == {LIAR}


def test_held_out_sums_checks() -> None:
    seen = HeldOut()
    seen.add(10, None)  # U-shaped: tokens, no sums
    ok = {"loss_sum": 3.5, "count": 10, "correct": 4}
    assert seen.sums(ok, "user u", served=True) == ok
    for bad in ({**ok, "count": 11}, {**ok, "correct": 11}, {**ok, "loss_sum": -1.0}, {**ok, "count": 2.5},
                {**ok, "loss_sum": float("nan")}, {"count": 1, "correct": 0}):
        with pytest.raises(InvalidInput):
            seen.sums(bad, "user u", served=True)
    assert HeldOut().sums({**ok, "count": 10**6}, "user u", served=False)["count"] == 10**6  # a device of the whole model
    relayed = HeldOut()
    relayed.add(6, EvalReply(loss_sum=1.25, count=6, correct=5))
    assert relayed.sums({"loss_sum": 0.0, "count": 10**9, "correct": 10**9}, "user u", served=True) == \
        {"loss_sum": 1.25, "count": 6, "correct": 5}


class Forger(EdgeServer):
    """Before its own report, reports another edge's user as its own (its weight would count for this edge)."""

    refusals: list[str] = []

    def _send(self, report: Report | None) -> None:
        if report is not None and report.mode is Mode.TRAIN:
            stolen = dict(report.metrics, **{"user-0": {"train_loss": 0.1}})
            forged = Report(round=report.round, edge=self.edge_id, mode=report.mode, num_samples=report.num_samples,
                            metrics=stolen, adapters=report.adapters)
            try:
                self.cloud.request("update", forged.to_message())
            except Exception as exc:  # noqa: BLE001  (what the cloud answered)
                Forger.refusals.append(str(exc))
            else:
                Forger.refusals.append("accepted")
        super()._send(report)


def test_an_edge_cannot_report_another_edges_users(hermetic_cache) -> None:
    sim = simulation(edges=2)
    edge = next(e for e in sim.edges if e.edge_id == "edge-1")
    assert "user-0" not in edge.runtime.sessions and not any(u == "user-0" for u in edge.users)
    edge.__class__ = Forger
    Forger.refusals = []
    row = round_metrics(sim)
    assert len(Forger.refusals) == 1 and "not started with" in Forger.refusals[0] and "user-0" in Forger.refusals[0]
    assert row["dropped"] == [] and torch.isfinite(torch.tensor(row["train_loss"]))
    assert row["users"]["user-0"]["train_loss"] != 0.1
