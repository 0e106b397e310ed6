"""What every tier runs: its partition with LoRA, per-session replicas and optimizers, the hooks."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from shared.model.adapters import AdapterSlots, AdapterState, clone_state, inject_lora
from shared.fl import Algorithm, RoundPlan, create_algorithm
from shared.protocol.codecs import CodecPolicy, ErrorFeedback
from shared.model.sources import ModelSource
from shared.model.partition import Split, build_partition, load_partition
from shared.config.model_spec import ModelSpec
from shared.runtime.session import OptimizerSettings, Session, SessionError




@dataclass
class TierContext:
    """What a plug-in may know of the tier it runs on; ``store`` persists across rounds on this tier."""

    tier: str
    layer_ids: list[int]
    num_layers: int
    spec: ModelSpec
    shapes: dict[str, tuple[int, ...]]
    store: dict[str, Any]










class TierRuntime:
    """A tier's compute, free of any transport: forward under a session's adapters, backward, step.

    One lock guards binding + forward; autograd keeps the bound tensors, so backward and the
    optimizer step of one session may run while another session does its forward.
    """

    def __init__(self, tier: str, source: ModelSource, spec: ModelSpec,
                 optimizer: OptimizerSettings | None = None, device: str = "cpu") -> None:
        self.tier, self.source, self.spec = tier, source, spec
        self.split = Split(spec.split[0], spec.split[1], source.num_layers)
        self.partition = load_partition(source, tier, self.split, spec.task, spec.num_labels,
                                        base_dropout=spec.base_dropout, seed=spec.seed)
        inject_lora(self.partition, spec.lora, spec.adapter)
        self.device = torch.device(device)
        self.partition.to(self.device)
        self.partition.train()
        self.slots = AdapterSlots(self.partition)
        self.policies = {hop: CodecPolicy.from_dict(spec.codecs.get(hop)) for hop in ("user_edge", "edge_cloud")}
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.sessions: dict[tuple[int, str], Session] = {}
        self.plugin_store: dict[str, dict[str, Any]] = {}  # per algorithm, kept across rounds (personal layers, ...)
        self.lock = threading.RLock()

    # sessions -------------------------------------------------------------------------------
    def open_session(self, plan: RoundPlan, state: AdapterState, algorithm: Algorithm | None = None) -> Session:
        """Make this tier's replica for (round, user) from the round's global adapters."""
        algorithm = algorithm or create_algorithm(plan.algorithm, plan.config)
        algorithm.ctx = TierContext(self.tier, self.partition.layer_ids, self.split.num_layers, self.spec,
                                    self.slots.shapes(), self.plugin_store.setdefault(plan.algorithm, {}))
        on_device = {k: v.to(self.device) for k, v in state.items() if k in self.slots.locations}
        params = algorithm.build_adapters(self.tier, on_device, plan)
        train = plan.mode == "train"
        for p in params.values():
            p.requires_grad_(train)
        optimizer = self.optimizer_settings.make(list(params.values()), plan.lr) if train else None
        session = Session(plan.round_id, plan.user_id, plan, algorithm, params, optimizer)
        with self.lock:
            self.sessions[session.key] = session
        return session

    def session(self, round_id: int, user_id: str) -> Session:
        try:
            return self.sessions[(round_id, user_id)]
        except KeyError:
            raise SessionError(f"no session for round {round_id}, user '{user_id}' on the {self.tier} tier") from None

    def close_session(self, round_id: int, user_id: str) -> Session:
        with self.lock:
            session = self.session(round_id, user_id)
            del self.sessions[session.key]
        return session

    def drop_sessions(self, keep: Any = lambda key: False) -> int:
        """Close every session whose key ``keep`` rejects (leftovers of failed rounds)."""
        with self.lock:
            stale = [k for k in self.sessions if not keep(k)]
            for k in stale:
                del self.sessions[k]
        return len(stale)

    def pack_update(self, session: Session) -> AdapterState:
        return {k: v.detach().cpu() for k, v in session.algorithm.pack_update(self.tier, session.params, session.plan).items()}

    # compute --------------------------------------------------------------------------------
    def _layers(self, session: Session, step: int) -> list[int]:
        if session.plan.mode != "train":
            return self.partition.layer_ids
        return session.algorithm.layers_to_run(self.tier, self.partition.layer_ids, session.plan, step)

    def forward(self, session: Session, hidden: torch.Tensor | None, attention_mask: torch.Tensor, step: int,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (user tier, from ``input_ids``) and this tier's blocks, under the session's adapters."""
        train = session.plan.mode == "train"
        with self.lock, torch.set_grad_enabled(train):
            self.slots.bind(session.params)
            if input_ids is not None:
                hidden = self.partition.embed_tokens(input_ids.to(self.device), attention_mask.to(self.device))
            return self.partition.run_blocks(hidden, attention_mask.to(self.device), self._layers(session, step))

    def head(self, session: Session, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cloud only: final norm and head. Call right after ``forward`` on the same thread."""
        with self.lock, torch.set_grad_enabled(session.plan.mode == "train"):
            self.slots.bind(session.params)
            return self.partition.run_head(hidden, attention_mask.to(self.device))

    def backward_and_step(self, session: Session, outputs: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Backpropagate into this tier's adapters, run the plug-in hooks, step the optimizer."""
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        extra = session.algorithm.extra_loss(self.tier, session.params, session.plan)
        if extra is not None:
            pairs.append((extra, None))
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        session.algorithm.after_backward(self.tier, session.params, session.plan)
        if session.optimizer is not None:
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
        session.steps += 1

    def policy(self, hop: str) -> CodecPolicy:
        """The codecs of one hop ("user_edge" or "edge_cloud"); fp32 (lossless) where none is set."""
        return self.policies[hop]

    def outgoing_grad(self, session: Session, grad: torch.Tensor, hop: str) -> tuple[torch.Tensor, dict[str, str]]:
        """A gradient ready to send back over ``hop``: top-k with error feedback kept here, or as it is."""
        spec = self.policy(hop).spec("gradients")
        if spec.name == "topk":
            if session.feedback is None:
                session.feedback = ErrorFeedback()
            grad = session.feedback.compress("grad", grad, k=spec.params.get("k"), ratio=spec.params.get("ratio"),
                                             values=spec.params.get("values", "fp32"))
        return grad, {"grad": str(spec)}

    def check_step(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        """Refuse step tensors that cannot belong to this model (ValueError: a 422 over HTTP).

        ``hidden`` carries the real tokens only (``pack_tokens``): one row per 1 in the mask.
        """
        width = int(self.partition.config.hidden_size)
        if attention_mask.dim() != 2 or attention_mask.is_floating_point() or attention_mask.numel() == 0:
            raise ValueError(f"attention_mask must be a non-empty integer tensor (batch, seq); got "
                             f"{attention_mask.dtype} {list(attention_mask.shape)}")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold 0s and 1s")
        tokens = int(attention_mask.sum())
        if hidden.dim() != 2 or list(hidden.shape) != [tokens, width] or not hidden.is_floating_point():
            raise ValueError(f"hidden must be a float tensor of the mask's {tokens} tokens x {width}; "
                             f"got {hidden.dtype} {list(hidden.shape)}")
        want = list(attention_mask.shape) if self.spec.task == "lm" else [attention_mask.shape[0]]
        if list(labels.shape) != want or labels.is_floating_point():
            raise ValueError(f"labels must be integers of shape {want}; got {labels.dtype} {list(labels.shape)}")
        if not torch.isfinite(hidden).all():
            raise ValueError("hidden contains NaN or Inf")

    def global_state_template(self) -> AdapterState:
        return clone_state(self.slots.current())

    def parameter_bytes(self) -> int:
        return self.partition.parameter_bytes()






def adapter_shapes(source: ModelSource, spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """Adapter shapes of every tier from the config alone (meta tensors: nothing is loaded)."""
    split = Split(spec.split[0], spec.split[1], source.num_layers)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for tier in ("user", "edge", "cloud"):
        part = build_partition(source, tier, split, spec.task, spec.num_labels, base_dropout=spec.base_dropout)
        inject_lora(part, spec.lora, spec.adapter, low_cpu_mem_usage=True)
        shapes[tier] = AdapterSlots(part).shapes()
    return shapes

