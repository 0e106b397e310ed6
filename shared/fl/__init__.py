"""Federated algorithms: aggregation, the plug-in interface and registry, and the built-in plug-ins."""

from shared.fl import devft, droppeft, fedara, fedavg, h2tune  # noqa: F401  (importing them registers each plug-in)
from shared.fl.plugin import (Algorithm, AlgorithmConfig, Participant, SessionContext, SessionPlugin, Strategy,
                              StrategyContext, algorithm_names, get_algorithm, register_algorithm)

__all__ = [
    "Algorithm", "AlgorithmConfig", "Participant", "SessionContext", "SessionPlugin", "Strategy", "StrategyContext",
    "algorithm_names", "get_algorithm", "register_algorithm",
]
