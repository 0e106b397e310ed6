"""The coordinator's view of the federation: edges (each serving one model deployment) and the users behind them."""

from __future__ import annotations

import threading

from shared.config.placement import Placement
from shared.errors import NotFound
from shared.fl.plugin import Participant
from shared.protocol.transport import Link


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
