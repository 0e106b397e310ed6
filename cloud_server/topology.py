"""The coordinator's view of the federation: edges (each serving one model deployment) and the users behind them."""

from __future__ import annotations

import math
import random
import threading

from cloud_server.records import RoundError
from shared.config.placement import Placement
from shared.config.round import RoundConfig
from shared.errors import NotFound
from shared.fl.plugin import Participant
from shared.protocol.transport import Link
from shared.seeds import derive_seed


class Topology:
    """Edges and their users, with each user's weight and the placement the cloud assigned it at registration."""

    def __init__(self, default_deployment: str = "") -> None:
        self.default_deployment = default_deployment
        self.edges: dict[str, Link] = {}
        self.edge_users: dict[str, dict[str, int]] = {}  # edge -> user -> its weight
        self.edge_deployment: dict[str, str] = {}  # edge -> the deployment (model) it serves
        self.placements: dict[str, Placement] = {}  # user -> its task, cut and rank
        self._cond = threading.Condition()

    def register_edge(self, edge_id: str, link: Link, deployment: str | None = None) -> None:
        with self._cond:
            self.edges[edge_id] = link
            self.edge_users.setdefault(edge_id, {})
            self.edge_deployment[edge_id] = deployment or self.default_deployment

    def register_user(self, edge_id: str, user_id: str, num_samples: int, placement: Placement | None = None) -> None:
        """A user behind ``edge_id``; a user that registers again through another edge moves there."""
        with self._cond:
            if edge_id not in self.edges:
                raise NotFound(f"unknown edge '{edge_id}'")
            for users in self.edge_users.values():
                users.pop(user_id, None)
            self.edge_users[edge_id][user_id] = num_samples
            self.placements[user_id] = placement or Placement()

    def edge_of(self, user_id: str) -> str | None:
        """The edge a user is registered behind."""
        with self._cond:
            return next((e for e, users in self.edge_users.items() if user_id in users), None)

    def deployment_of(self, user_id: str) -> str:
        """The deployment a registered user trains: its edge's."""
        edge = self.edge_of(user_id)
        if edge is None:
            raise NotFound(f"user '{user_id[:64]}' is not registered")
        return self.edge_deployment.get(edge, self.default_deployment)

    def participants(self) -> list[Participant]:
        out = []
        with self._cond:
            for e, users in sorted(self.edge_users.items()):
                for u, n in sorted(users.items()):
                    p = self.placements.get(u, Placement())
                    out.append(Participant(u, e, n, p.data, p.cut, p.rank, self.edge_deployment.get(e, "")))
        return out

    def select(self, request: RoundConfig, seed: int, round_id: int) -> list[Participant]:
        """A round's participants: the users it names, a fraction of everyone drawn from the round's seed, or everyone."""
        everyone = self.participants()
        if request.participants:
            known = {p.user_id: p for p in everyone}
            unknown = [u for u in request.participants if u not in known]
            if unknown:
                raise RoundError(f"unknown participants {unknown}")
            return [known[u] for u in sorted(set(request.participants))]
        if request.fraction is not None:
            k = max(1, math.ceil(request.fraction * len(everyone)))
            rng = random.Random(derive_seed(seed, round_id, "select"))
            return sorted(rng.sample(everyone, k), key=lambda p: (p.edge_id, p.user_id))
        return everyone
