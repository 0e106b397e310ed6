"""Algorithm plug-ins: the interface, the registry, FedAvg (importing this registers the built-ins)."""

from shared.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Participant,
    RoundPlan,
    algorithm_names,
    create_algorithm,
    default_lr,
    register_algorithm,
)
from shared.algorithms import fedavg  # noqa: F401  (registers "fedavg")
from shared.algorithms import fedara  # noqa: F401  (registers "fedara")
from shared.algorithms import droppeft  # noqa: F401  (registers "droppeft")

__all__ = [
    "Algorithm", "AlgorithmConfig", "Participant", "RoundPlan",
    "algorithm_names", "create_algorithm", "default_lr", "register_algorithm",
]
