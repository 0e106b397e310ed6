"""A tier's compute, free of any transport: its partition with adapters, the sessions, forward, backward, step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.config.deployment import ModelSpec
from shared.errors import NotFound
from shared.fl.plugin import SessionContext, get_algorithm
from shared.model.adapters import AdapterSlots, AdapterState, clone_state, inject_lora, tensor_kind_of
from shared.model.partition import Split, build_partition, load_partition
from shared.model.sources import ModelSource
from shared.protocol.codecs import CodecPolicy, ErrorFeedback
from shared.protocol.clock import VirtualClock
from shared.protocol.enums import TIERS, Hop, Tier
from shared.protocol.messages import RoundPlan
from shared.runtime.session import OptimizerSettings, Session


@dataclass(frozen=True)
class StepLimits:
    """What a step's tensors must be to belong to this model: the width, the compute dtype, the labels' range."""

    width: int
    task: str  # "lm" or "cls"
    classes: int  # the head's outputs: the vocabulary (lm) or the labels (cls)
    dtype: torch.dtype = torch.float32
    labels: bool = True  # steps carry labels (not in a U-shaped chain: they stay on the device)


class TierRuntime:
    """A tier's compute, free of any transport: forward under a session's adapters, backward, step.

    One lock guards binding + forward; autograd keeps the bound tensors, so backward and the
    optimizer step of one session may run while another session does its forward. With a
    ``clock`` (the simulator's ``VirtualClock``) each training forward charges the blocks it runs.
    """

    def __init__(self, tier: Tier | str, source: ModelSource, spec: ModelSpec,
                 optimizer: OptimizerSettings | None = None, device: str = "cpu", clock: VirtualClock | None = None) -> None:
        self.tier, self.source, self.spec = Tier(tier), source, spec
        self.split = Split(spec.split[0], spec.split[1], source.num_layers)
        self.partition = load_partition(source, self.tier, self.split, spec.task, spec.num_labels,
                                        base_dropout=spec.base_dropout, seed=spec.seed, head_tier=spec.head_tier)
        inject_lora(self.partition, spec.lora, spec.adapter)
        self.device = torch.device(device)
        self.partition.to(self.device)
        self.partition.train()
        self.slots = AdapterSlots(self.partition)
        self.policies = {hop: CodecPolicy.from_dict(spec.codecs.get(hop.value)) for hop in Hop}
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.clock = clock
        self.sessions: dict[tuple[int, str], Session] = {}
        self.plugin_store: dict[str, dict[str, Any]] = {}  # per algorithm, kept across rounds (personal layers, ...)
        self.lock = threading.RLock()

    @property
    def width(self) -> int:
        return int(self.partition.config.hidden_size)

    @property
    def step_limits(self) -> StepLimits:
        """What an arriving step's tensors must be (see ``shared.runtime.steps.check_step``)."""
        classes = self.spec.num_labels if self.spec.task == "cls" else int(self.partition.config.vocab_size)
        dtype = next((p.dtype for p in self.partition.parameters()), torch.float32)
        return StepLimits(self.width, self.spec.task, classes, dtype, labels=not self.spec.u_shaped)

    # sessions -------------------------------------------------------------------------------
    def open_session(self, plan: RoundPlan, state: AdapterState) -> Session:
        """Make this tier's replica for (round, user) from the round's global adapters."""
        ctx = SessionContext(self.tier, plan, list(self.partition.layer_ids), self.split.num_layers, self.spec,
                             self.slots.shapes(), self.plugin_store.setdefault(plan.algorithm, {}), tensor_kind_of)
        plugin = get_algorithm(plan.algorithm).session(plan.config, ctx)
        on_device = {k: v.to(self.device) for k, v in state.items() if k in self.slots.locations}
        params = plugin.build_adapters(on_device)
        for p in params.values():
            p.requires_grad_(plan.training)
        optimizer = (self.optimizer_settings.make(params, plan.lr, plugin.lr_scales(), ctx.tensor_kind)
                     if plan.training else None)
        with self.lock:  # the blocks as loaded: no other session's overrides bound while the plug-in reads them
            base = self._check_base(plugin.base_overrides({i: self.partition.blocks[str(i)]
                                                           for i in self.partition.layer_ids}))
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
        return {k: v.detach().cpu() for k, v in session.plugin.pack_update(session.params).items()}

    # compute --------------------------------------------------------------------------------
    @contextmanager
    def _bound(self, session: Session) -> Iterator[None]:
        """The session's adapters (and base weight overrides, restored afterwards) on the partition's modules."""
        with self.lock, torch.set_grad_enabled(session.plan.training):
            self.slots.bind(session.params)
            originals: dict[str, torch.Tensor] = {}
            try:
                for name, value in session.base.items():
                    originals[name] = self._swap_base(name, value)
                yield
            finally:
                for name, value in originals.items():
                    self._swap_base(name, value)

    def _check_base(self, overrides: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A plug-in's base weight overrides name frozen parameters of this partition, with their shapes."""
        frozen = {name: p for name, p in self.partition.named_parameters() if name not in self.slots.locations}
        for name, value in overrides.items():
            if name not in frozen or tuple(value.shape) != tuple(frozen[name].shape):
                raise ValueError(f"base override '{name}' is not a frozen parameter of the {self.tier} partition "
                                 f"with shape {tuple(value.shape)}")
        return {name: value.to(self.device) for name, value in overrides.items()}

    def _swap_base(self, name: str, value: torch.Tensor) -> torch.Tensor:
        module_name, _, pname = name.rpartition(".")
        module = self.partition.get_submodule(module_name)
        old = getattr(module, pname)
        setattr(module, pname, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))
        return old

    def forward(self, session: Session, hidden: torch.Tensor | None, attention_mask: torch.Tensor, step: int,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (user tier, from ``input_ids``) and this tier's blocks, under the session's adapters."""
        layers = session.plugin.layers_to_run(step)
        if self.clock is not None and session.plan.training:
            self.clock.charge_blocks(self.tier, session.round_id, session.user_id, len(layers))
        with self._bound(session), _timed(session):
            if input_ids is not None:
                hidden = self.partition.embed_tokens(input_ids.to(self.device), attention_mask.to(self.device))
            if session.plan.training:
                session.blocks_run += len(layers)
            return self.partition.run_blocks(hidden, attention_mask.to(self.device), layers)

    def head(self, session: Session, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cloud only: final norm and head. Call right after ``forward`` on the same thread."""
        with self._bound(session), _timed(session):
            return self.partition.run_head(hidden, attention_mask.to(self.device))

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
            with self.lock:
                if session.feedback is None:
                    session.feedback = ErrorFeedback()
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


def adapter_shapes(source: ModelSource, spec: ModelSpec) -> dict[Tier, dict[str, tuple[int, ...]]]:
    """Adapter shapes of every tier from the config alone (meta tensors: nothing is loaded)."""
    split = Split(spec.split[0], spec.split[1], source.num_layers)
    shapes: dict[Tier, dict[str, tuple[int, ...]]] = {}
    for tier in TIERS:
        part = build_partition(source, tier, split, spec.task, spec.num_labels, base_dropout=spec.base_dropout,
                               head_tier=spec.head_tier)
        inject_lora(part, spec.lora, spec.adapter, low_cpu_mem_usage=True)
        shapes[tier] = AdapterSlots(part).shapes()
    return shapes
