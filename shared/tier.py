"""What every tier runs: its partition with LoRA, per-session replicas and optimizers, the hooks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.adapters import AdapterSlots, AdapterState, LoraSettings, clone_state, inject_lora
from shared.algorithms import Algorithm, RoundPlan, create_algorithm
from shared.codecs import CodecPolicy, ErrorFeedback
from shared.models import ModelSource
from shared.partition import Split, build_partition, load_partition


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the architecture of the split model; identical on every tier."""

    model: str
    split: tuple[int, int]
    task: str
    num_labels: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    base_dropout: bool = False
    seed: int = 0
    adapter: str = "lora"  # "lora", or "svd" (P diag(e) Q, what FedARA trains)
    codecs: dict[str, dict[str, str]] = field(default_factory=dict, hash=False)  # hop -> CodecPolicy fields

    def to_meta(self) -> dict[str, Any]:
        return {"model": self.model, "split": list(self.split), "task": self.task, "num_labels": self.num_labels,
                "lora": self.lora.to_dict(), "base_dropout": self.base_dropout, "seed": self.seed,
                "adapter": self.adapter, "codecs": {h: dict(p) for h, p in self.codecs.items()}}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "ModelSpec":
        return cls(model=meta["model"], split=tuple(meta["split"]), task=meta["task"], num_labels=meta["num_labels"],
                   lora=LoraSettings(**meta["lora"]), base_dropout=meta["base_dropout"], seed=meta["seed"],
                   adapter=meta.get("adapter", "lora"), codecs=dict(meta.get("codecs", {})))


@dataclass
class TierContext:
    """What a plug-in may know of the tier it runs on; ``store`` persists across rounds on this tier."""

    tier: str
    layer_ids: list[int]
    num_layers: int
    spec: ModelSpec
    shapes: dict[str, tuple[int, ...]]
    store: dict[str, Any]


@dataclass
class OptimizerSettings:
    """AdamW per tier and session (the same elementwise update as one optimizer over the whole model)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def make(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
        if not params:
            return None
        return torch.optim.AdamW(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


class SessionError(KeyError):
    """A step or update names a session this tier does not hold."""


class Busy(RuntimeError):
    """This tier holds as many sessions as it may; the caller should retry later (HTTP 503)."""


@dataclass
class Session:
    """One (round, user) replica on one tier: its adapters, optimizer state and counters."""

    round_id: int
    user_id: str
    plan: RoundPlan
    algorithm: Algorithm
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    feedback: Any = None  # error feedback of top-k compressed gradients this tier sends
    step_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one step at a time
    last_step: int = -1
    last_reply: Any = None  # the reply to ``last_step``, returned again if that step is retried

    def replay(self, step: int) -> Any:
        """The cached reply when ``step`` is a retry of the last one; refuses steps from the past."""
        if step == self.last_step and self.last_reply is not None:
            return self.last_reply
        if step <= self.last_step:
            raise ValueError(f"step {step} of round {self.round_id}, user '{self.user_id}' is older than the last "
                             f"step served ({self.last_step})")
        return None

    def remember(self, step: int, reply: Any) -> Any:
        self.last_step, self.last_reply = step, reply
        return reply

    @property
    def key(self) -> tuple[int, str]:
        return (self.round_id, self.user_id)


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


def pack_tokens(t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, width) -> (tokens, width): only the positions the mask keeps cross a cut.

    Exact: padding positions influence no real position (their keys are masked, their labels
    ignored), so their activations need not travel and their gradients are zero.
    """
    return t[attention_mask.to(t.device, torch.bool)]


def unpack_tokens(rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(tokens, width) -> (batch, seq, width), zeros at padding positions."""
    out = rows.new_zeros((*attention_mask.shape, rows.shape[-1]))
    out[attention_mask.to(rows.device, torch.bool)] = rows
    return out


def adapter_shapes(source: ModelSource, spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """Adapter shapes of every tier from the config alone (meta tensors: nothing is loaded)."""
    split = Split(spec.split[0], spec.split[1], source.num_layers)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for tier in ("user", "edge", "cloud"):
        part = build_partition(source, tier, split, spec.task, spec.num_labels, base_dropout=spec.base_dropout)
        inject_lora(part, spec.lora, spec.adapter, low_cpu_mem_usage=True)
        shapes[tier] = AdapterSlots(part).shapes()
    return shapes

