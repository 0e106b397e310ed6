"""FedAvg: the default algorithm and the reference for the others (every hook left as the base's)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.fl.plugin import Algorithm, AlgorithmConfig, register_algorithm


@dataclass
class FedAvgConfig(AlgorithmConfig):
    """FedAvg has no options: sample-weighted means per tier."""


@register_algorithm
class FedAvg(Algorithm):
    name = "fedavg"
    config_cls = FedAvgConfig
