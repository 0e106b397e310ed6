"""In-process simulation: C users behind E edges and one cloud, on the services' code path.

Every message is encoded and decoded as on the network, and a round runs as the services run it:
the cloud starts the edges, each edge starts its users, and the users train concurrently, each in a
thread of its own (``UserAgent.on_start``), reporting to their edge when done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cloud_server.records import RoundRecord
from cloud_server.rounds import Coordinator
from edge_server.compute import EdgeServer
from shared.config.deployment import DataSpec, ModelSpec, codecs_for
from shared.config.round import RoundConfig
from shared.data.datasets import FederatedDataset
from shared.fl.plugin import get_algorithm
from shared.http.metrics import ByteLedger
from shared.model.adapters import LoraSettings, initial_state
from shared.model.partition import Split
from shared.model.sources import ModelSource, resolve_model
from shared.protocol.bundle import AdapterBundle
from shared.protocol.clock import VirtualClock
from shared.protocol.enums import Tier
from shared.protocol.links import LinkEmulator, link_emulator
from shared.protocol.transport import InProcessLink
from shared.runtime.tier import TierRuntime, adapter_shapes
from shared.seeds import derive_seed
from user_agent.compute import UserAgent


class RoundFailed(RuntimeError):
    """A simulated round did not commit; the message carries the coordinator's reason."""


def default_split(num_layers: int) -> tuple[int, int]:
    """A small user share and the middle of the model for the edge: (max(1, L // 15), L // 2)."""
    a = min(max(1, num_layers // 15), num_layers)
    return a, max(a, num_layers // 2)


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
    block_ms: float | None = None  # a virtual clock (ms per block step at 1x, shared.protocol.clock); None: wall clock

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.max_len < 2:
            raise ValueError(f"--rounds must be >= 0 and --max-len >= 2 (got {self.rounds}, {self.max_len})")
        if self.block_ms is not None and not self.block_ms > 0:
            raise ValueError(f"--block-ms must be > 0 (got {self.block_ms})")
        if self.block_ms is not None and self.round.micro_batches > 1:  # overlapping micro-batches would add up
            raise ValueError("the virtual clock (--block-ms) adds up a step's blocks and messages; it does not model "
                             "pipelined micro-batches: use micro_batches 1 with it, or the wall clock")

    def slowdown(self, user: int) -> float:
        """The compute slowdown of user ``user`` (the list cycled; 1 without one)."""
        return self.slowdowns[user % len(self.slowdowns)] if self.slowdowns else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["lora"] = self.lora.to_dict()
        out["round"] = self.round.to_dict()
        out["split"] = list(self.split) if self.split else None
        return out


class Simulation:
    """Builds the topology from a config; ``run_round`` drives one round through the coordinator."""

    def __init__(self, config: SimConfig, source: ModelSource | None = None,
                 dataset: FederatedDataset | None = None) -> None:
        if config.edges < 1 or config.users < config.edges:
            raise ValueError(f"need at least one edge and one user per edge (got {config.users} users, {config.edges} edges)")
        self.config = config
        get_algorithm(config.round.algorithm).parse_config(config.round.config)  # fail before loading anything
        self.source = source or resolve_model(config.model)
        self.data_spec = DataSpec(name=config.data, num_clients=config.users, partition=config.partition,
                                  alpha=config.alpha, seed=config.seed, max_len=config.max_len, min_chars=config.min_chars,
                                  pad_to_max=config.pad_to_max,
                                  max_examples_per_client=config.max_examples_per_client,
                                  eval_examples_per_client=config.eval_examples_per_client)
        self.dataset = dataset or self.data_spec.load()
        split = config.split or default_split(self.source.num_layers)
        Split(split[0], split[1], self.source.num_layers)  # validate with a clear error
        self.spec = ModelSpec(model=config.model, split=tuple(split), task=self.dataset.task,
                              num_labels=self.dataset.num_labels, lora=config.lora, seed=config.seed,
                              adapter=config.adapter, codecs=codecs_for(config.user_edge_codecs, config.edge_cloud_codecs),
                              u_shaped=config.u_shaped, tokenizer=config.tokenizer)
        shapes = adapter_shapes(self.source, self.spec)
        initial = AdapterBundle({tier: initial_state(shapes[tier], config.seed, kind=config.adapter) for tier in shapes})
        self.tokenizer = tokenizer = self.source.tokenizer(config.tokenizer)
        self.clock = None if config.block_ms is None else VirtualClock(
            config.block_ms / 1000.0, {f"user-{i}": config.slowdown(i) for i in range(config.users)})
        cloud_rt = TierRuntime(Tier.CLOUD, self.source, self.spec, clock=self.clock)
        edge_rt = TierRuntime(Tier.EDGE, self.source, self.spec, clock=self.clock)
        user_rt = TierRuntime(Tier.USER, self.source, self.spec, clock=self.clock)
        self.runtimes = {Tier.USER: user_rt, Tier.EDGE: edge_rt, Tier.CLOUD: cloud_rt}
        # each server-side tier counts its hop by round as the services do, so reports carry the same bytes
        self.coordinator = Coordinator(cloud_rt, initial, seed=config.seed, ledger=ByteLedger())
        self.edge_links: list[InProcessLink] = []
        self.user_links: list[InProcessLink] = []
        self.edges: list[EdgeServer] = []
        self.emulators: dict[str, list[LinkEmulator]] = {"user_edge": [], "edge_cloud": []}
        for e in range(config.edges):
            edge_id = f"edge-{e}"
            emulator = self._emulator("edge_cloud", config.edge_link, edge_id)
            cloud_ledger = self.coordinator.ledger
            up = InProcessLink(self.coordinator, upward=True, wire=config.wire, emulator=emulator, ledger=cloud_ledger,
                               clock=self.clock)
            edge = EdgeServer(edge_id, edge_rt, up, ledger=ByteLedger())
            down = InProcessLink(edge, upward=False, wire=config.wire, emulator=emulator, ledger=cloud_ledger)
            self.coordinator.register_edge(edge_id, down)
            self.edges.append(edge)
            self.edge_links += [up, down]
        self.users: list[UserAgent] = []
        for i, client in enumerate(self.dataset.clients):
            edge = self.edges[i % config.edges]
            user_id = f"user-{i}"
            emulator = self._emulator("user_edge", config.user_link, user_id)
            up = InProcessLink(edge, upward=True, wire=config.wire, emulator=emulator, ledger=edge.ledger, clock=self.clock)
            agent = UserAgent(user_id, user_rt, client, tokenizer, up, max_len=config.max_len, slowdown=config.slowdown(i),
                              pad_to_max=config.pad_to_max)
            down = InProcessLink(agent, upward=False, wire=config.wire, emulator=emulator, ledger=edge.ledger)
            edge.register_user(user_id, down, agent.num_samples)
            self.coordinator.register_user(edge.edge_id, user_id, agent.num_samples)
            self.users.append(agent)
            self.user_links += [up, down]

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
        for key in ("eval_accuracy", "eval_perplexity", "eval_token_accuracy", "compute_seconds", "blocks_per_step",
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
