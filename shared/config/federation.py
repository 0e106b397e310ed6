"""A federation of several model deployments, each training one or more tasks (data sets).

A deployment is one base model with its split points and LoRA settings, and one ``Experiment`` (the
model spec with that task's head, and the data set's partition) per task it trains. Users of a
deployment's tasks share its block adapters (FedAvg over the model's users); each task has a head
of its own. Keys of the global adapters are the model's own in a federation of one deployment;
with several, each deployment's keys are prefixed ``<deployment>/`` (``deployment_prefix``), and a
deployment that trains several tasks prefixes each head's keys with ``<data>/`` (``head_prefix``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config.deployment import DataSpec, Experiment, ModelSpec, codecs_for
from shared.config.settings import CloudSettings, DeploymentEntry
from shared.errors import InvalidInput
from shared.model.adapters import LoraSettings
from shared.model.partition import Split, default_split
from shared.model.sources import resolve_model

NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def deployment_name(model: str) -> str:
    """A deployment's default name: the bundled model's name, or a directory's base name."""
    return NAME.sub("-", Path(model.rstrip("/")).name) or "model"


@dataclass
class Deployment:
    """One base model the cloud serves, and one experiment per task (data set) it trains, the first the default."""

    name: str
    experiments: dict[str, Experiment]

    def __post_init__(self) -> None:
        if not self.experiments:
            raise ValueError(f"deployment '{self.name}' trains no task")
        u_shaped = next(iter(self.experiments.values())).spec.u_shaped
        if u_shaped and len(self.experiments) > 1:
            raise ValueError(f"deployment '{self.name}': a U-shaped chain keeps the head on the device, one task only")

    @property
    def primary(self) -> Experiment:
        return next(iter(self.experiments.values()))

    @property
    def spec(self) -> ModelSpec:
        return self.primary.spec

    @property
    def tasks(self) -> list[str]:
        return list(self.experiments)

    def head_prefix(self, data: str | None) -> str:
        """The prefix of a task's head keys: none where the deployment trains one task."""
        return f"{data or self.tasks[0]}/" if len(self.experiments) > 1 else ""

    def experiment(self, data: str | None) -> Experiment:
        """The experiment of a task (the default one for None); an unknown task is refused, naming those served."""
        if data is None:
            return self.primary
        if data not in self.experiments:
            raise InvalidInput(f"deployment '{self.name}' does not train task '{data}'; it trains {', '.join(self.tasks)}")
        return self.experiments[data]

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name, "experiments": [e.to_meta() for e in self.experiments.values()]}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Deployment:
        experiments = [Experiment.from_meta(e) for e in meta["experiments"]]
        return cls(meta["name"], {e.data.name: e for e in experiments})


@dataclass
class Federation:
    """The deployments a cloud serves, the first the default (edges and users that name none join it)."""

    deployments: dict[str, Deployment] = field(default_factory=dict)

    @property
    def primary(self) -> Deployment:
        return next(iter(self.deployments.values()))

    @property
    def namespaced(self) -> bool:
        return len(self.deployments) > 1

    def deployment_prefix(self, name: str) -> str:
        return f"{name}/" if self.namespaced else ""

    def served(self) -> str:
        """What the cloud serves, for error messages: ``minilm-l6 (trec, sms_spam), smollm2-135m (sentiment)``."""
        return ", ".join(f"{d.name} ({', '.join(d.tasks)})" for d in self.deployments.values())

    def deployment(self, model: str | None) -> Deployment:
        """The deployment of a model (by its deployment name or its model string); the default for None."""
        if model is None:
            return self.primary
        for d in self.deployments.values():
            if model in (d.name, d.spec.model):
                return d
        raise InvalidInput(f"this cloud does not serve model '{model[:80]}'; it serves {self.served()}")


def task_experiments(spec: ModelSpec, data: DataSpec, names: list[str]) -> dict[str, Experiment]:
    """One experiment per data set name: ``spec`` with that task's head, ``data`` with that name."""
    out: dict[str, Experiment] = {}
    for name in names:
        task_data = dataclasses.replace(data, name=name)
        task, labels = task_data.task_and_labels()
        out[name] = Experiment(dataclasses.replace(spec, task=task, num_labels=labels if task == "cls" else 0), task_data)
    return out


def federation_from(settings: CloudSettings) -> Federation:
    """The deployments a cloud's settings describe: ``--model`` with its ``--data`` tasks first, then ``--deployments``.

    Each is checked in one line (a model without a head for a task, an unusable tokenizer, split points
    out of range), before anything is loaded.
    """
    first = DeploymentEntry(model=settings.model, split=settings.split, data=settings.data, rank=settings.rank,
                            target_modules=list(settings.target_modules), tokenizer=settings.tokenizer)
    federation = Federation()
    for entry in [first, *settings.deployments]:
        deployment = _deployment(entry, settings)
        if deployment.name in federation.deployments:
            raise ValueError(f"two deployments are named '{deployment.name}': give one of them a name")
        federation.deployments[deployment.name] = deployment
    return federation


def _deployment(entry: DeploymentEntry, s: CloudSettings) -> Deployment:
    names = list(dict.fromkeys(d.strip() for d in entry.data.split(",") if d.strip()))
    if not names:
        raise ValueError(f"deployment of {entry.model}: no data set named")
    source = resolve_model(entry.model)
    tokenizer = entry.tokenizer or ""
    source.tokenizer(tokenizer)  # refused here, in one line, if unusable
    split = Split.parse(entry.split, source.num_layers) if entry.split else Split(*default_split(source.num_layers),
                                                                                  source.num_layers)
    lora = LoraSettings(rank=entry.rank or s.rank, alpha=s.lora_alpha, dropout=s.lora_dropout,
                        target_modules=list(entry.target_modules or []))
    spec = ModelSpec(model=entry.model, split=(split.a, split.b), task="", lora=lora, seed=s.seed, adapter=s.adapter,
                     codecs=codecs_for(s.user_edge_codecs, s.edge_cloud_codecs), u_shaped=s.u_shaped, tokenizer=tokenizer)
    data = DataSpec(name=names[0], num_clients=s.num_clients, partition=s.partition, alpha=s.dirichlet_alpha,
                    seed=s.seed, max_len=s.max_len, min_chars=s.min_chars, pad_to_max=s.pad_to_max,
                    max_examples_per_client=s.max_examples_per_client, eval_examples_per_client=s.eval_examples_per_client)
    experiments = task_experiments(spec, data, names)
    for experiment in experiments.values():
        source.family.require(experiment.spec.task)  # a model without a head for the task: one line
    return Deployment(entry.name or deployment_name(entry.model), experiments)
