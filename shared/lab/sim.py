"""In-process simulation: C users behind E edges and one cloud, on the services' code path.

Every message is encoded and decoded as on the network, and a round runs as the services run it:
the cloud starts the edges, each edge starts its users, and the users train concurrently, each in a
thread of its own (``UserAgent.on_start``), reporting to their edge when done.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cloud_server.records import RoundRecord
from cloud_server.rounds import Coordinator
from edge_server.compute import EdgeServer
from shared.config.deployment import DataSpec, Experiment, ModelSpec, codecs_for
from shared.config.federation import Deployment, Federation, deployment_name
from shared.config.placement import Declared, assign, device_bytes
from shared.config.round import RoundConfig
from shared.data.datasets import FederatedDataset
from shared.fl.plugin import get_algorithm
from shared.http.metrics import ByteLedger
from shared.model.adapters import LoraSettings
from shared.model.partition import Split, default_split
from shared.model.sources import ModelSource, resolve_model
from shared.protocol.clock import VirtualClock
from shared.protocol.enums import Tier
from shared.protocol.links import LinkEmulator, link_emulator
from shared.protocol.transport import InProcessLink
from shared.runtime.tier import TierRuntime, federation_state
from shared.seeds import derive_seed
from user_agent.compute import UserAgent


class RoundFailed(RuntimeError):
    """A simulated round did not commit; the message carries the coordinator's reason."""


@dataclass
class SimConfig:
    """A simulated deployment; ``round`` is every round's configuration (``shared.config.round.RoundConfig``)."""

    model: str = "tiny-llama"
    data: str = "shakespeare"
    users: int = 4
    edges: int = 2
    rounds: int = 3
    split: tuple[int, int] | None = None
    round: RoundConfig = field(default_factory=RoundConfig)
    max_len: int = 64
    min_chars: int = 0
    pad_to_max: bool = False
    partition: str = "default"
    alpha: float = 0.5
    max_examples_per_client: int | None = 256
    eval_examples_per_client: int = 32
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    wire: bool = True
    baseline_eval: bool = True
    user_link: str = "none"  # link profile of each user's hop to its edge (shared/protocol/link_profiles.json)
    edge_link: str = "none"  # link profile of each edge's hop to the cloud
    link_sleep: bool = False  # really wait the link time (wall clock) instead of a virtual clock
    user_edge_codecs: str = "fp32"  # e.g. "int8", or "activations=int8,gradients=topk:ratio=0.1"
    edge_cloud_codecs: str = "fp32"
    adapter: str = "lora"  # or "svd" (what FedARA trains)
    u_shaped: bool = False  # labels never leave the device (the user holds the head and the loss)
    tokenizer: str = ""  # --tokenizer NAME_OR_DIR; "" = the model's own files, else the byte-level fallback
    slowdowns: list[float] = field(default_factory=list)  # per-user compute slowdown factors (heterogeneous devices)
    # a heterogeneous federation: each list is cycled over the users (empty: ``model``, ``data``, the defaults)
    user_models: list[str] = field(default_factory=list)  # each user's base model (a deployment per model)
    user_data: list[str] = field(default_factory=list)  # each user's task (data set)
    cuts: list[int] = field(default_factory=list)  # the blocks each user declares it can hold (its cut, up to b)
    memory_budgets: list[int] = field(default_factory=list)  # or the bytes it declares
    ranks: list[int] = field(default_factory=list)  # each user's LoRA rank
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> its split (default: default_split)
    autocast: str = "off"  # every tier's mixed precision ("bf16": matmuls in bfloat16), as the services' --autocast
    block_ms: float | None = None  # a virtual clock (ms per block step at 1x, shared.protocol.clock); None: wall clock
    # the users' ids (default user-0, user-1, ...); a user's id seeds its batch order, so a client run alone under
    # the id it has in a federation trains on the same batches as there
    user_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.max_len < 2:
            raise ValueError(f"--rounds must be >= 0 and --max-len >= 2 (got {self.rounds}, {self.max_len})")
        if self.block_ms is not None and not self.block_ms > 0:
            raise ValueError(f"--block-ms must be > 0 (got {self.block_ms})")
        if self.user_ids and len(self.user_ids) != self.users:
            raise ValueError(f"user_ids names {len(self.user_ids)} users, not {self.users}")
        if self.block_ms is not None and self.round.micro_batches > 1:  # overlapping micro-batches would add up
            raise ValueError("the virtual clock (--block-ms) adds up a step's blocks and messages; it does not model "
                             "pipelined micro-batches: use micro_batches 1 with it, or the wall clock")

    def slowdown(self, user: int) -> float:
        """The compute slowdown of user ``user`` (the list cycled; 1 without one)."""
        return self.slowdowns[user % len(self.slowdowns)] if self.slowdowns else 1.0

    def user_id(self, i: int) -> str:
        return self.user_ids[i] if self.user_ids else f"user-{i}"

    def user(self, i: int) -> tuple[str, str, Declared]:
        """User ``i``'s model, task and declarations (each list cycled over the users)."""
        def pick(values: list[Any], default: Any = None) -> Any:
            return values[i % len(values)] if values else default

        return (pick(self.user_models, self.model), pick(self.user_data, self.data),
                Declared(max_blocks=pick(self.cuts), memory_budget=pick(self.memory_budgets), rank=pick(self.ranks)))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["lora"] = self.lora.to_dict()
        out["round"] = self.round.to_dict()
        out["split"] = list(self.split) if self.split else None
        out["splits"] = {m: list(v) for m, v in self.splits.items()}
        return out


class Simulation:
    """Builds the topology from a config; ``run_round`` drives one round through the coordinator.

    A heterogeneous federation gives each user its own model, task, cut and rank (``user_models``,
    ``user_data``, ``cuts``, ``ranks``): each model is a deployment of its own (its split from
    ``splits``, its rank the largest any of its users declares), with ``edges`` edges, and each data set
    is partitioned among the users that train it.
    """

    def __init__(self, config: SimConfig, source: ModelSource | None = None,
                 dataset: FederatedDataset | None = None) -> None:
        if config.edges < 1 or config.users < config.edges:
            raise ValueError(f"need at least one edge and one user per edge (got {config.users} users, {config.edges} edges)")
        self.config = config
        get_algorithm(config.round.algorithm).parse_config(config.round.config)  # fail before loading anything
        users = [config.user(i) for i in range(config.users)]
        self.sources = {m: source if source is not None and m == config.model else resolve_model(m)
                        for m in dict.fromkeys(m for m, _, _ in users)}
        self.datasets = {}
        for d in dict.fromkeys(d for _, d, _ in users):
            data_spec = self._data_spec(d, sum(1 for _, du, _ in users if du == d))
            self.datasets[d] = dataset if dataset is not None and d == config.data else data_spec.load()
        self.federation = Federation({})
        for m, src in self.sources.items():
            self.federation.deployments[deployment_name(m)] = self._deployment(m, src, users)
        primary = self.federation.primary
        self.source, self.spec = self.sources[primary.spec.model], primary.spec
        self.data_spec, self.dataset = primary.primary.data, self.datasets[primary.primary.data.name]
        self.tokenizer = self.source.tokenizer(config.tokenizer)
        self.clock = None if config.block_ms is None else VirtualClock(
            config.block_ms / 1000.0, {config.user_id(i): config.slowdown(i) for i in range(config.users)})
        clouds, edge_rts = {}, {}
        for name, dep in self.federation.deployments.items():
            src, specs = self.sources[dep.spec.model], {d: e.spec for d, e in dep.experiments.items()}
            clouds[name] = TierRuntime(Tier.CLOUD, src, dep.spec, tasks=specs, clock=self.clock, autocast=config.autocast)
            edge_rts[name] = TierRuntime(Tier.EDGE, src, dep.spec, tasks=specs, cut=dep.spec.split[1],
                                         clock=self.clock, autocast=config.autocast)
        initial = federation_state(self.federation, {n: self.sources[d.spec.model] for n, d in
                                                     self.federation.deployments.items()}, config.seed)
        # each server-side tier counts its hop by round as the services do, so reports carry the same bytes
        self.coordinator = Coordinator(clouds if self.federation.namespaced else clouds[primary.name],
                                       initial, seed=config.seed, ledger=ByteLedger())
        self.edge_links: list[InProcessLink] = []
        self.user_links: list[InProcessLink] = []
        self.edges: list[EdgeServer] = []
        self.emulators: dict[str, list[LinkEmulator]] = {"user_edge": [], "edge_cloud": []}
        edges_of: dict[str, list[EdgeServer]] = {}
        for name in self.federation.deployments:
            for _ in range(config.edges):
                edge_id = f"edge-{len(self.edges)}"
                emulator = self._emulator("edge_cloud", config.edge_link, edge_id)
                cloud_ledger = self.coordinator.ledger
                up = InProcessLink(self.coordinator, upward=True, wire=config.wire, emulator=emulator, ledger=cloud_ledger,
                                   clock=self.clock)
                edge = EdgeServer(edge_id, edge_rts[name], up, ledger=ByteLedger())
                down = InProcessLink(edge, upward=False, wire=config.wire, emulator=emulator, ledger=cloud_ledger)
                self.coordinator.register_edge(edge_id, down, name if self.federation.namespaced else None)
                self.edges.append(edge)
                edges_of.setdefault(name, []).append(edge)
                self.edge_links += [up, down]
        self.users: list[UserAgent] = []
        user_rts: dict[tuple[str, str, int], TierRuntime] = {}
        sizes: dict[str, tuple[int, list[int]]] = {}
        for i, (model, data, declared) in enumerate(users):
            name = deployment_name(model)
            dep, src = self.federation.deployments[name], self.sources[model]
            spec = dep.experiment(data).spec
            if declared.memory_budget is not None and name not in sizes:
                sizes[name] = device_bytes(src, spec)
            placement = assign(declared, spec, sizes.get(name), data if len(dep.experiments) > 1 else None)
            cut = spec.split[0] if placement.cut is None else placement.cut
            if (name, data, cut) not in user_rts:
                user_rts[(name, data, cut)] = TierRuntime(Tier.USER, src, spec, cut=cut, clock=self.clock,
                                                          autocast=config.autocast)
            ordinal = sum(1 for _, d, _ in users[:i] if d == data)
            mine = sum(1 for m, _, _ in users[:i] if m == model)
            edge = edges_of[name][mine % config.edges]
            user_id = config.user_id(i)
            emulator = self._emulator("user_edge", config.user_link, user_id)
            up = InProcessLink(edge, upward=True, wire=config.wire, emulator=emulator, ledger=edge.ledger, clock=self.clock)
            tokenizer = self.tokenizer if model == primary.spec.model else src.tokenizer(config.tokenizer)
            agent = UserAgent(user_id, user_rts[(name, data, cut)], self.datasets[data].clients[ordinal], tokenizer, up,
                              max_len=config.max_len, slowdown=config.slowdown(i), pad_to_max=config.pad_to_max)
            down = InProcessLink(agent, upward=False, wire=config.wire, emulator=emulator, ledger=edge.ledger)
            edge.register_user(user_id, down, agent.num_samples, cut)
            self.coordinator.register_user(edge.edge_id, user_id, agent.num_samples, placement)
            self.users.append(agent)
            self.user_links += [up, down]
        default_user = next(rt for (n, _, c), rt in user_rts.items() if n == primary.name)
        self.runtimes = {Tier.USER: default_user, Tier.EDGE: edge_rts[primary.name], Tier.CLOUD: clouds[primary.name]}

    def _data_spec(self, name: str, clients: int) -> DataSpec:
        c = self.config
        return DataSpec(name=name, num_clients=clients, partition=c.partition, alpha=c.alpha, seed=c.seed,
                        max_len=c.max_len, min_chars=c.min_chars, pad_to_max=c.pad_to_max,
                        max_examples_per_client=c.max_examples_per_client,
                        eval_examples_per_client=c.eval_examples_per_client)

    def _deployment(self, model: str, source: ModelSource, users: list[tuple[str, str, Declared]]) -> Deployment:
        """A model's deployment: its split, a rank as large as its users declare, one experiment per task it trains."""
        c = self.config
        split = c.splits.get(model) or (c.split if model == c.model else None) or default_split(source.num_layers)
        Split(split[0], split[1], source.num_layers)  # validate with a clear error
        ranks = [decl.rank for m, _, decl in users if m == model and decl.rank is not None]
        lora = dataclasses.replace(c.lora, rank=max([c.lora.rank, *ranks]))
        experiments = {}
        for data in dict.fromkeys(d for m, d, _ in users if m == model):
            ds = self.datasets[data]
            spec = ModelSpec(model=model, split=tuple(split), task=ds.task, num_labels=ds.num_labels, lora=lora,
                             seed=c.seed, adapter=c.adapter, codecs=codecs_for(c.user_edge_codecs, c.edge_cloud_codecs),
                             u_shaped=c.u_shaped, tokenizer=c.tokenizer)
            experiments[data] = Experiment(spec, self._data_spec(data, len(ds.clients)))
        return Deployment(deployment_name(model), experiments)

    def _emulator(self, hop: str, profile_name: str, owner: str) -> LinkEmulator | None:
        emulator = link_emulator(profile_name, derive_seed(self.config.seed, owner, "link"), sleep=self.config.link_sleep)
        if emulator is not None:
            self.emulators[hop].append(emulator)
        return emulator

    def link_seconds(self) -> dict[str, dict[str, float]]:
        out = {}
        for hop, emulators in self.emulators.items():
            snaps = [e.clock.snapshot() for e in emulators]
            out[hop] = {"up": sum(s["seconds_up"] for s in snaps), "down": sum(s["seconds_down"] for s in snaps)}
        return out

    def request(self, **changes: Any) -> RoundConfig:
        """The configured round, with ``changes`` (``evaluate=False``, ...)."""
        return self.config.round.model_copy(update=changes)

    def bytes(self) -> dict[str, dict[str, int]]:
        def total(links: list[InProcessLink]) -> dict[str, int]:
            snaps = [l.stats.snapshot() for l in links]
            return {"up": sum(s["bytes_up"] for s in snaps), "down": sum(s["bytes_down"] for s in snaps)}

        return {"user_edge": total(self.user_links), "edge_cloud": total(self.edge_links)}

    def run_record(self, request: RoundConfig | None = None) -> RoundRecord:
        """One round as the coordinator records it, once every user's thread is done."""
        record = self.coordinator.run_round(self.coordinator.new_round(request or self.request()))
        self.wait_users()
        return record

    def run_round(self, request: RoundConfig | None = None) -> dict[str, Any]:
        before = (self.bytes(), self.link_seconds())
        t0 = time.perf_counter()
        record = self.run_record(request)
        return self._row(record, before, time.perf_counter() - t0)

    def wait_users(self) -> None:
        """Until every user's thread has finished its last job (its final update's reply included)."""
        for user in self.users:
            user.wait()

    def evaluate_only(self) -> dict[str, Any]:
        """Held-out metrics of the current global adapters without training (the round-0 row)."""
        before = (self.bytes(), self.link_seconds())
        t0 = time.perf_counter()
        record = self.coordinator.evaluate_current()
        self.wait_users()
        return self._row(record, before, time.perf_counter() - t0)

    def _row(self, record: RoundRecord, before_: tuple[dict, dict], seconds: float) -> dict[str, Any]:
        if record.state != "committed":
            raise RoundFailed(f"round {record.round_id} {record.state}: {record.error}")
        before, links_before = before_
        links = self.link_seconds()
        after = self.bytes()
        hops = {h: {d: after[h][d] - before[h][d] for d in ("up", "down")} for h in after}
        m = record.metrics
        row: dict[str, Any] = {
            "round": record.round_id, "version": record.version,
            "train_loss": m.get("train_loss"), "eval_loss": m.get("eval_loss"),
            "bytes_up": hops["user_edge"]["up"] + hops["edge_cloud"]["up"],
            "bytes_down": hops["user_edge"]["down"] + hops["edge_cloud"]["down"],
            "bytes": {"user": {"up": hops["user_edge"]["up"], "down": hops["user_edge"]["down"]},
                      "edge": {"up": hops["edge_cloud"]["up"], "down": hops["edge_cloud"]["down"]}},
            "seconds": seconds,
            "link_seconds": {h: {d: links[h][d] - links_before[h][d] for d in ("up", "down")} for h in links},
        }
        for key in ("eval_accuracy", "eval_perplexity", "eval_token_accuracy", "tasks", "compute_seconds", "blocks_per_step",
                    record.request.algorithm):  # the last: the algorithm's own figures (DevFT's stage), if any
            if key in m:
                row[key] = m[key]
        return row

    def run(self, on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        rows = []
        if self.config.baseline_eval:
            rows.append(self.evaluate_only())
            if on_row:
                on_row(rows[-1])
        for _ in range(self.config.rounds):
            rows.append(self.run_round())
            if on_row:
                on_row(rows[-1])
        return rows
