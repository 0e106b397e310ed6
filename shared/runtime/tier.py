"""A tier's compute, free of any transport: its partition with adapters, the sessions, forward, backward, step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from shared.config.deployment import ModelSpec
from shared.config.federation import Federation
from shared.config.threads import AUTOCAST_MODES
from shared.data.batching import EVAL_BATCH_SIZE
from shared.errors import InvalidInput, NotFound
from shared.fl.namespaces import with_prefix
from shared.fl.plugin import SessionContext, get_algorithm
from shared.model.adapters import (
    AdapterSlots,
    AdapterState,
    block_of,
    clone_state,
    initial_state,
    inject_lora,
    tensor_kind_of,
)
from shared.model.partition import HeadParts, Partition, Split, build_partition, load_partition
from shared.model.sources import ModelSource
from shared.protocol.bundle import AdapterBundle
from shared.protocol.codecs import CodecPolicy
from shared.protocol.clock import VirtualClock
from shared.protocol.enums import TIERS, Hop, Tier
from shared.protocol.messages import RoundPlan
from shared.runtime.copies import BlockCopies, BlockCopy, swap_weight
from shared.runtime.session import OptimizerSettings, Session


# the dtype torch.autocast computes a tier's matmuls in, by its ``autocast`` setting (AUTOCAST_MODES; "off": none).
# bfloat16 only: it has float32's range, so gradients need no loss scaling (float16's would, across the tiers)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


@dataclass(frozen=True)
class StepLimits:
    """What a step's tensors must be to belong to this model: the width, the compute dtype, the labels' range."""

    width: int
    task: str  # "lm" or "cls"
    classes: int  # the head's outputs: the vocabulary (lm) or the labels (cls)
    dtype: torch.dtype = torch.float32
    labels: bool = True  # steps carry labels (not in a U-shaped chain: they stay on the device)
    rows: int | None = None  # the most examples in one step: the plan's batch (an evaluation's: EVAL_BATCH_SIZE)
    positions: int | None = None  # the longest sequence: the model's positions (max_position_embeddings)


@dataclass
class Variant:
    """One task a runtime serves: its spec (the head's task and labels), the adapter slots its sessions bind, the
    partition that runs its head (on the head's tier), and the prefix of its head's keys in the global state."""

    spec: ModelSpec
    slots: AdapterSlots
    head: Partition | None
    prefix: str = ""
    index: int = 0  # its place among the tier's tasks: its head and slots in each ``BlockCopy``

    def local(self, key: str) -> str | None:
        """A global key as this task's sessions name it; None for another task's head."""
        if "/" not in key:
            return key
        return key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else None

    def shared(self, key: str) -> str:
        """A session's key as the global state names it (a head's under the task's prefix)."""
        return self.prefix + key if self.prefix and key.startswith("head.") else key


class TierRuntime:
    """A tier's compute, free of any transport: forward under a session's adapters, backward, step.

    A forward binds its session's adapters onto one of ``copies`` copies of the blocks that share the frozen
    weights (``shared.runtime.copies``; one: forwards take turns); autograd keeps the bound tensors, so backward and
    the optimizer step of one session (and a frozen head's projection, ``head``) may run while another session does
    its forward on the same copy. ``lock`` guards the sessions and a reload. With a
    ``clock`` (the simulator's ``VirtualClock``) each training forward charges the blocks it runs.

    ``cut`` is where the blocks this process holds begin or end, where participants have cuts of their
    own: a device holds [0, cut), an edge [cut, b) (``hold_from`` extends it when a user with a lower cut
    registers). Each session runs the blocks of its participant's cut (``plan.cut``; the deployment's a
    by default).

    ``tasks`` (data set name -> spec) are the tasks of a deployment that trains several: they share the
    blocks and their adapters, and each has a head of its own (loaded once, beside the blocks) whose keys
    carry the task's prefix (``Variant``). A session serves the task of its plan (``plan.data``).
    """

    def __init__(self, tier: Tier | str, source: ModelSource, spec: ModelSpec,
                 optimizer: OptimizerSettings | None = None, device: str = "cpu", cut: int | None = None,
                 tasks: Mapping[str, ModelSpec] | None = None, clock: VirtualClock | None = None,
                 autocast: str = "off", copies: int = 1) -> None:
        self.tier, self.source, self.spec = Tier(tier), source, spec
        self.task_names = list(tasks or {})  # the deployment's tasks (data sets), where known
        self.tasks = dict(tasks) if tasks and len(tasks) > 1 else {}
        self.device = torch.device(device)
        if autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {autocast!r}")
        self.autocast = _AUTOCAST_DTYPES.get(autocast)
        self.lock = threading.RLock()
        self.copies = BlockCopies(1 if self.tier is Tier.USER else copies)  # a device runs one session
        self._load(spec.split[0] if cut is None else cut)
        self.policies = {hop: CodecPolicy.from_dict(spec.codecs.get(hop.value)) for hop in Hop}
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.clock = clock
        self.sessions: dict[tuple[int, str], Session] = {}
        self.plugin_store: dict[str, dict[str, Any]] = {}  # per algorithm, kept across rounds (personal layers, ...)

    def _load(self, cut: int) -> None:
        """Read this tier's blocks for ``cut`` (see the class doc), attach the adapters and find their slots."""
        self.split = Split(cut, self.spec.split[1], self.source.num_layers)
        partition = load_partition(self.source, self.tier, self.split, self.spec.task, self.spec.num_labels,
                                   base_dropout=self.spec.base_dropout, seed=self.spec.seed, head_tier=self.spec.head_tier)
        inject_lora(partition, self.spec.lora, self.spec.adapter)
        variants: dict[str | None, Variant] = {}
        for data, spec in (self.tasks or {None: self.spec}).items():
            head = None
            if partition.head is not None:
                head = partition if not variants else load_partition(
                    self.source, Tier.CLOUD, Split(self.source.num_layers, self.source.num_layers, self.source.num_layers),
                    spec.task, spec.num_labels, base_dropout=spec.base_dropout, seed=spec.seed)
                head.to(self.device).train()
            variants[data] = Variant(spec, AdapterSlots(partition, head), head, f"{data}/" if self.tasks else "",
                                     len(variants))
        partition.to(self.device)
        partition.train()
        self.partition, self.variants = partition, variants
        self.slots = next(iter(variants.values())).slots
        tasks = list(variants.values())
        self.copies.reset(BlockCopy(partition, [v.head for v in tasks], [v.slots for v in tasks]))

    def hold_from(self, cut: int) -> None:
        """An edge: hold blocks [cut, b) too (a user whose own cut is lower registered); a no-op if it does."""
        if self.tier is not Tier.EDGE:
            raise ValueError("only an edge extends the blocks it holds")
        with self.lock, self.copies.quiet():  # sessions keep their own tensors: they bind onto reloaded modules too
            if cut < self.split.a:
                Split(cut, self.spec.split[1], self.source.num_layers)  # a clear error for a cut out of range
                self._load(cut)

    def layers_for(self, plan: RoundPlan) -> list[int]:
        """The blocks a participant's session runs on this tier: its own cut decides the user's and the edge's."""
        a, b, total = self.spec.split[0] if plan.cut is None else plan.cut, self.spec.split[1], self.source.num_layers
        if not 0 <= a <= b:
            raise InvalidInput(f"cut {a} of user '{plan.user_id}' is out of range: 0 <= cut <= {b}")
        layers = list({Tier.USER: range(a), Tier.EDGE: range(a, b), Tier.CLOUD: range(b, total)}[self.tier])
        held = set(self.partition.layer_ids)
        if not held.issuperset(layers):
            raise InvalidInput(f"the {self.tier} tier holds blocks {sorted(held)}; user '{plan.user_id}' with cut {a} "
                               f"needs {layers}")
        return layers

    def serves(self, plan: RoundPlan) -> bool:
        """Whether a participant's steps come through the serving tiers: its device does not hold every block."""
        return (self.spec.split[0] if plan.cut is None else plan.cut) < self.source.num_layers

    @property
    def width(self) -> int:
        return int(self.partition.config.hidden_size)

    def variant(self, plan: RoundPlan) -> Variant:
        """The task a session serves: its plan's (the deployment's first where the plan names none)."""
        return self.task_variant(plan.data)

    def task_variant(self, data: str | None) -> Variant:
        if data is None or not self.tasks:
            return next(iter(self.variants.values()))
        if data not in self.variants:
            raise InvalidInput(f"this deployment does not train task '{data[:64]}'; it trains {', '.join(self.tasks)}")
        return self.variants[data]

    def task_name(self, data: str | None) -> str:
        """A task's name in round metrics: its data set (the deployment's first for None), else its kind."""
        return data or (self.task_names[0] if self.task_names else self.spec.task)

    def step_limits(self, session: Session) -> StepLimits:
        """What an arriving step of ``session`` must be (see ``shared.runtime.steps.check_step``)."""
        spec = self.variant(session.plan).spec
        classes = spec.num_labels if spec.task == "cls" else int(self.partition.config.vocab_size)
        dtype = self.partition.compute_dtype()
        plan = session.plan
        rows = plan.batch_size if plan.training else max(plan.batch_size, EVAL_BATCH_SIZE)
        positions = getattr(self.partition.config, "max_position_embeddings", None)
        return StepLimits(self.width, spec.task, classes, dtype, labels=not spec.u_shaped, rows=rows,
                          positions=positions if isinstance(positions, int) else None)

    # sessions -------------------------------------------------------------------------------
    def open_session(self, plan: RoundPlan, state: AdapterState) -> Session:
        """Make this tier's replica for (round, user) from the round's global adapters."""
        if plan.rank is not None and plan.rank > self.spec.lora.rank:
            raise InvalidInput(f"rank {plan.rank} of user '{plan.user_id}' exceeds the deployment's {self.spec.lora.rank}")
        layers, variant = self.layers_for(plan), self.variant(plan)
        shapes = {k: v for k, v in variant.slots.shapes().items() if block_of(k) is None or block_of(k) in layers}
        ctx = SessionContext(self.tier, plan, layers, self.split.num_layers, variant.spec, shapes,
                             self.plugin_store.setdefault(plan.algorithm, {}), tensor_kind_of)
        plugin = get_algorithm(plan.algorithm).session(plan.config, ctx)
        local = {name: v for k, v in state.items() if (name := variant.local(k)) is not None}
        on_device = {k: v.to(self.device) for k, v in local.items() if k in shapes or plugin.accepts(k)}
        params = plugin.build_adapters(on_device)
        for p in params.values():
            p.requires_grad_(plan.training)
        optimizer = (self.optimizer_settings.make(params, plan.lr, plugin.lr_scales(), ctx.tensor_kind)
                     if plan.training else None)
        with self.copies.take() as blocks:  # as loaded: no other session's overrides bound while the plug-in reads them
            base = self._check_base(plugin.base_overrides({i: blocks.partition.blocks[str(i)] for i in layers}))
        session = Session(plan, plugin, params, optimizer, base=base)
        with self.lock:
            self.sessions[session.key] = session
        return session

    def session(self, round_id: int, user_id: str) -> Session:
        try:
            return self.sessions[(round_id, user_id)]
        except KeyError:
            raise NotFound(f"no session for round {round_id}, user '{user_id}' on the {self.tier} tier") from None

    def close_session(self, round_id: int, user_id: str) -> Session:
        with self.lock:
            session = self.session(round_id, user_id)
            del self.sessions[session.key]
        return session

    def drop_sessions(self, keep: Callable[[tuple[int, str]], bool] = lambda key: False) -> int:
        """Close every session whose key ``keep`` rejects (leftovers of failed rounds)."""
        with self.lock:
            stale = [k for k in self.sessions if not keep(k)]
            for k in stale:
                del self.sessions[k]
        return len(stale)

    def pack_update(self, session: Session) -> AdapterState:
        """What leaves this tier of a session, under the global state's names."""
        variant = self.variant(session.plan)
        return {variant.shared(k): v.detach().cpu() for k, v in session.plugin.pack_update(session.params).items()}

    # compute --------------------------------------------------------------------------------
    @contextmanager
    def _bound(self, session: Session) -> Iterator[BlockCopy]:
        """A copy of the blocks with the session's adapters (and base weight overrides, restored afterwards) bound."""
        with self.copies.take() as blocks, torch.set_grad_enabled(session.plan.training):
            blocks.slots[self.variant(session.plan).index].bind(session.plugin.bound(session.params))
            originals: dict[str, torch.Tensor] = {}
            try:
                for name, value in session.base.items():
                    originals[name] = swap_weight(blocks.partition, name, value)
                yield blocks
            finally:
                for name, value in originals.items():
                    swap_weight(blocks.partition, name, value)

    def _check_base(self, overrides: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A plug-in's base weight overrides name frozen parameters of this partition, with their shapes."""
        frozen = {name: p for name, p in self.partition.named_parameters() if name not in self.slots.locations}
        for name, value in overrides.items():
            if name not in frozen or tuple(value.shape) != tuple(frozen[name].shape):
                raise ValueError(f"base override '{name}' is not a frozen parameter of the {self.tier} partition "
                                 f"with shape {tuple(value.shape)}")
        return {name: value.to(self.device) for name, value in overrides.items()}

    def forward(self, session: Session, hidden: torch.Tensor | None, attention_mask: torch.Tensor, step: int,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (user tier, from ``input_ids``) and this tier's blocks, under the session's adapters."""
        layers = session.plugin.layers_to_run(step)
        if self.clock is not None and session.plan.training:
            self.clock.charge_blocks(self.tier, session.round_id, session.user_id, len(layers))
        with self._bound(session) as blocks, _timed(session), self._mixed() as out_dtype:
            if input_ids is not None:
                hidden = blocks.partition.embed_tokens(input_ids.to(self.device), attention_mask.to(self.device))
            if session.plan.training:
                session.blocks_run += len(layers)
            return blocks.partition.run_blocks(hidden, attention_mask.to(self.device), layers).to(out_dtype)

    def head(self, session: Session, hidden: torch.Tensor, attention_mask: torch.Tensor,
             then: Callable[[HeadParts], Any] | None = None) -> Any:
        """The head tier only: final norm and the session's task's head on ``forward``'s output, its logits; or what
        ``then`` makes of the head's parts (``head_loss``, ``head_counts``: a language model's logits a chunk of
        positions at a time) under the same autocast (micro-batches may call it from other threads: ``_bound`` holds
        a copy of the blocks). ``then`` runs after the copy is given back where the parts are ``standalone`` (a frozen
        projection, as a language model's usually is): the projection's forward and backward, a large part of such a
        step, then run beside other sessions' forwards instead of holding them up."""
        index = self.variant(session.plan).index
        with self._bound(session) as blocks, _timed(session), self._mixed() as out_dtype:
            head = blocks.heads[index]
            if head is None:
                raise ValueError(f"the {self.tier} tier runs no head")
            parts = head.head_parts(hidden, attention_mask.to(self.device))
            if then is None:
                return parts.to_logits(parts.features).to(out_dtype)
            if not parts.standalone:
                return then(parts)
        with torch.set_grad_enabled(session.plan.training), _timed(session), self._mixed():
            return then(parts)

    @contextmanager
    def _mixed(self) -> Iterator[torch.dtype]:
        """torch's autocast to ``self.autocast`` where one is set (matmuls in bfloat16, adapters and optimizer state
        in float32); yields the dtype the tier's outputs leave in: the partition's own, with or without it."""
        dtype = self.partition.compute_dtype()
        if self.autocast is None:
            yield dtype
            return
        with torch.autocast(self.device.type, dtype=self.autocast):
            yield dtype

    def backward(self, session: Session, outputs: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Backpropagate into this tier's adapters; the gradients of several calls (micro-batches) add up."""
        with _timed(session):
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    def step(self, session: Session) -> None:
        """The step's update, once its gradients are in: the plug-in's ``extra_loss`` and ``after_backward``, AdamW."""
        with _timed(session):
            extra = session.plugin.extra_loss(session.params)
            if extra is not None:
                torch.autograd.backward([extra])
            session.plugin.after_backward(session.params)
            if session.optimizer is not None:
                session.optimizer.step()
                session.optimizer.zero_grad(set_to_none=True)
        session.steps += 1

    def backward_and_step(self, session: Session, outputs: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """A whole step's backward and update."""
        self.backward(session, outputs, grads)
        self.step(session)

    def policy(self, hop: Hop | str) -> CodecPolicy:
        """The codecs of one hop; fp32 (lossless) where none is set."""
        return self.policies[Hop(hop)]

    def outgoing_grad(self, session: Session, grad: torch.Tensor, hop: Hop, micro: int = 0) -> torch.Tensor:
        """A gradient ready to send back over ``hop``: top-k with error feedback kept here (per micro-batch of a
        step), or as it is."""
        spec = self.policy(hop).spec("gradients")
        if spec.name == "topk":
            grad = session.feedback.compress(("grad", micro), grad, k=spec.params.get("k"),
                                             ratio=spec.params.get("ratio"), values=spec.params.get("values", "fp32"))
        return grad

    def global_state_template(self) -> AdapterState:
        return clone_state(self.slots.current())

    def parameter_bytes(self) -> int:
        return self.partition.parameter_bytes()


@contextmanager
def _timed(session: Session) -> Iterator[None]:
    """Add the block's seconds to the session's compute time."""
    started = time.perf_counter()
    try:
        yield
    finally:
        session.compute_seconds += time.perf_counter() - started


def adapter_shapes(source: ModelSource, spec: ModelSpec,
                   tasks: Mapping[str, ModelSpec] | None = None) -> dict[Tier, dict[str, tuple[int, ...]]]:
    """Adapter shapes of every tier from the config alone (meta tensors: nothing is loaded); with several ``tasks``,
    each task's head under its prefix (``Variant``)."""
    split = Split(spec.split[0], spec.split[1], source.num_layers)
    shapes: dict[Tier, dict[str, tuple[int, ...]]] = {}
    for tier in TIERS:
        shapes[tier] = {}
        for data, task_spec in (tasks if tasks and len(tasks) > 1 else {"": spec}).items():
            part = build_partition(source, tier, split, task_spec.task, task_spec.num_labels,
                                   base_dropout=task_spec.base_dropout, head_tier=task_spec.head_tier)
            inject_lora(part, task_spec.lora, task_spec.adapter, low_cpu_mem_usage=True)
            prefix = f"{data}/" if data else ""
            shapes[tier].update({prefix + k if k.startswith("head.") else k: v for k, v in AdapterSlots(part).shapes().items()})
    return shapes


def federation_state(federation: Federation, sources: Mapping[str, ModelSource], seed: int) -> AdapterBundle:
    """Version-0 adapters of every deployment of a federation (``sources`` by deployment name), each tier's in one
    state, a deployment's keys under its prefix."""
    states: dict[Tier, AdapterState] = {t: {} for t in TIERS}
    for name, dep in federation.deployments.items():
        shapes = adapter_shapes(sources[name], dep.spec, {d: e.spec for d, e in dep.experiments.items()})
        for tier in TIERS:
            state = initial_state(shapes[tier], seed, kind=dep.spec.adapter)
            states[tier].update(with_prefix(state, federation.deployment_prefix(name)))
    return AdapterBundle(states)
