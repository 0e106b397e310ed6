"""Algorithm plug-ins: the interface, the registry, FedAvg (importing this registers the built-ins)."""

from shared.fl.plugin import (Algorithm, AlgorithmConfig, Participant, RoundPlan, algorithm_names, create_algorithm, default_lr, register_algorithm)
from shared.fl import fedavg  # noqa: F401  (registers "fedavg")
from shared.fl import fedara  # noqa: F401  (registers "fedara")
from shared.fl import droppeft  # noqa: F401  (registers "droppeft")

__all__ = [
    "Algorithm", "AlgorithmConfig", "Participant", "RoundPlan",
    "algorithm_names", "create_algorithm", "default_lr", "register_algorithm",
]
