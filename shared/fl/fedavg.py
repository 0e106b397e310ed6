"""FedAvg: the default algorithm and the reference for the others (every hook left as the base's)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.fl.plugin import AlgorithmConfig, register_algorithm


@dataclass
class FedAvgConfig(AlgorithmConfig):
    """FedAvg has no options: sample-weighted means per tier."""


FEDAVG = register_algorithm("fedavg", config=FedAvgConfig)
