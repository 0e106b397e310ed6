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

__all__ = [
    "Algorithm", "AlgorithmConfig", "Participant", "RoundPlan",
    "algorithm_names", "create_algorithm", "default_lr", "register_algorithm",
]
