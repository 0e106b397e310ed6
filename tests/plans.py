"""Round plans for tests of the hooks and tiers: the round settings a real plan gets from its RoundConfig."""

from __future__ import annotations

from typing import Any

from shared.protocol.messages import RoundPlan


def make_plan(round_id: int = 1, user_id: str = "u", **fields: Any) -> RoundPlan:
    """A plan with small round settings (2 steps of 2 examples, lr 1e-3) unless ``fields`` say otherwise."""
    settings: dict[str, Any] = {"local_steps": 2, "batch_size": 2, "lr": 1e-3, **fields}
    return RoundPlan(round_id=round_id, user_id=user_id, **settings)


def ticket_bytes(credential: Any, view: dict[str, Any], users_by_edge: dict[str, list[str]], seed: int,
                 modes: tuple[str, ...] = ("train", "eval")) -> dict[str, int]:
    """The bytes the cloud's round tickets (``shared.http.tickets``) add to a round's starts, down each hop: each
    edge's start carries its users' ``tickets``, each user's start its own ``ticket``. The simulator sends none. A
    ticket holds the user's plan, made here as the cloud makes it from the round's request (``view``, a round of a
    plug-in without per-user extras, every user at the deployment's placement) and the cloud's ``seed``; its length
    is fixed by those and the cloud's certificate (``iat`` and ``exp`` have 10 digits until 2286)."""
    import msgpack

    from shared.http.tickets import issue_ticket

    request = view["request"]
    fields = {"local_steps": request["local_steps"], "batch_size": request["batch_size"], "lr": float(request["lr"]),
              "seed": seed, "algorithm": request["algorithm"], "config": dict(request["config"]),
              "micro_batches": request["micro_batches"]}
    down = {"edge_cloud": 0, "user_edge": 0}
    for mode in modes:
        for edge, users in users_by_edge.items():
            tickets = {u: issue_ticket(credential, make_plan(view["round_id"], u, mode=mode, **fields), edge)
                       for u in users}
            down["edge_cloud"] += len(msgpack.packb("tickets")) + len(msgpack.packb(tickets))
            down["user_edge"] += sum(len(msgpack.packb("ticket")) + len(msgpack.packb(t)) for t in tickets.values())
    return down


def hop_bytes(row: dict[str, Any], tickets: dict[str, int]) -> dict[str, dict[str, int]]:
    """A simulator row's bytes per hop, named as a round's metrics name them, with the cloud's tickets
    (``ticket_bytes``) added down each hop: the simulator has no credentials, so it sends none."""
    return {hop: {"up": row["bytes"][mine]["up"], "down": row["bytes"][mine]["down"] + tickets[hop]}
            for hop, mine in (("user_edge", "user"), ("edge_cloud", "edge"))}
