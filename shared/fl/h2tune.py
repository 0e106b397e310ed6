"""H2Tune (arXiv 2507.22633): federated fine-tuning across base models, ranks and tasks by sharing middle matrices only.

Every adapted weight trains dW = B (M_shared + M_task) A (peft's LoRA layer holds A and B; the session
binds (M_shared + M_task) A in A's place, so autograd reaches all four). A (r x k), B (d x r) and M_task
(r x r) are private: they stay on the tier that trains them, per user, across rounds (``ctx.store``).
Only M_shared (r x r, r the user's own rank) is shared, sparsified before upload (the share s_i of its
entries that changed most this round, indices on the wire: ``shared.fl.alignment``). s_i comes from the
client's declared resources: its rank r_i (what its device declared it can train, capped by the deployment's
R) scales the ``keep`` of a full-rank client, s_i = keep * r_i / R (``sparsity: "rank"``), or ``keep`` for all
(``"uniform"``).

Rounds alternate phases (``phase_rounds`` rounds each, the first ``task``): in a ``task`` phase M_task
trains and M_shared is frozen (nothing of it leaves the tier); in a ``shared`` phase M_shared trains with
M_task frozen, and is uploaded. A and B train in both.

The cloud aligns the layers of every model to shared slots (relative depth, or representation similarity on
a probe batch: ``shared.fl.probe``) and averages each slot's
middle matrices over every client, deployment and tier that sent them, entry by entry (sample-weighted,
zero-padded to the largest rank: an entry counts only the clients that sent it); each module's new
M_shared is its slot's mean cut to its deployment's rank (entries nobody sent keep their value). Task
heads are averaged over their task's users (their keys carry the task's prefix).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shared.config.deployment import ModelSpec
from shared.config.round import RoundConfig
from shared.errors import InvalidInput
from shared.fl.aggregation import AdapterUpdate
from shared.fl.alignment import (
    A_SUFFIX,
    B_SUFFIX,
    MEAN,
    WEIGHT,
    M,
    check_upload,
    dense_parts,
    module_of,
    module_orders,
    slot_of,
    sparse,
)
from shared.fl.plugin import (
    AlgorithmConfig,
    SessionPlugin,
    Strategy,
    StrategyContext,
    register_algorithm,
)
from shared.fl.probe import probe_grams, similarity_map
from shared.model.adapters import AdapterState, block_of, initial_state
from shared.protocol.bundle import AdapterBundle
from shared.protocol.enums import TIERS, Tier

PRIVATE = "private"  # ctx.store[PRIVATE][user_id][key]: a user's A, B and M_task on this tier
TASK, SHARED = ".h2_task", ".h2_shared"  # the session's parameters of the two parts of M
ALIGNMENTS, SPARSITIES = ("depth", "similarity"), ("rank", "uniform")


@dataclass
class H2TuneConfig(AlgorithmConfig):
    """Options of H2Tune."""

    keep: float = 0.5  # the fraction of M_shared's entries a client of the deployment's full rank uploads
    sparsity: str = "rank"  # s_i: "rank" (keep * r_i / R: a client's share scales with its declared rank), "uniform"
    slots: int = 0  # alignment slots (0: the shallowest model's depth)
    alignment: str = "depth"  # "depth" (relative depth) or "similarity" (CKA on a probe batch: shared.fl.probe)
    phase_rounds: int = 1  # rounds per phase; phases alternate task, shared, task, ...

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise InvalidInput(f"h2tune: keep must lie in (0, 1], got {self.keep}")
        if self.slots < 0 or self.phase_rounds < 1:
            raise InvalidInput("h2tune: slots must be >= 0 and phase_rounds >= 1")
        if self.alignment not in ALIGNMENTS:
            raise InvalidInput(f"h2tune: alignment '{self.alignment}' is not supported; use one of {', '.join(ALIGNMENTS)}")
        if self.sparsity not in SPARSITIES:
            raise InvalidInput(f"h2tune: sparsity '{self.sparsity}' is not supported; use one of {', '.join(SPARSITIES)}")

    def keep_of(self, rank: int, full: int) -> float:
        """s_i, the share of its r_i x r_i M_shared a client of rank ``rank`` uploads (``full``: the deployment's R)."""
        return self.keep * min(rank, full) / full if self.sparsity == "rank" and full > 0 else self.keep


def phase(config: H2TuneConfig, round_id: int) -> str:
    """``task`` or ``shared``: which part of M trains in this round (rounds count from 1)."""
    return "task" if ((max(round_id, 1) - 1) // config.phase_rounds) % 2 == 0 else "shared"


class H2TuneSession(SessionPlugin):
    config: H2TuneConfig

    @property
    def modules(self) -> list[str]:
        return sorted(k[: -len(A_SUFFIX)] for k in self.ctx.shapes if k.endswith(A_SUFFIX))

    def accepts(self, key: str) -> bool:
        return key.endswith(M) and block_of(key) in self.ctx.layer_ids

    def build_adapters(self, state: AdapterState) -> dict[str, nn.Parameter]:
        """A, B and M_task from this user's private store (first round: the deployment's initial A and B, M_task
        zero), M_shared from the round's download (first round: the identity), at the user's rank."""
        full = self.ctx.shapes[self.modules[0] + A_SUFFIX][0] if self.modules else 0
        r = min(self.plan.rank or full, full)
        private = self.ctx.store.setdefault(PRIVATE, {}).setdefault(self.plan.user_id, {})
        lora = {k: s for k, s in self.ctx.shapes.items() if module_of(k) is not None and k not in private}
        seed = self.ctx.spec.seed if self.ctx.spec is not None else 0
        private.update({k: (v[:r] if k.endswith(A_SUFFIX) else v[:, :r]) for k, v in initial_state(lora, seed).items()})
        out: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        for module in self.modules:
            shared = state.get(module + M, torch.eye(full))[:r, :r]
            self.start[module] = shared.detach().clone()
            out.update({module + A_SUFFIX: private[module + A_SUFFIX], module + B_SUFFIX: private[module + B_SUFFIX],
                        module + SHARED: shared, module + TASK: private.get(module + TASK, torch.zeros(r, r))})
        heads = [k for k in self.ctx.shapes if module_of(k) is None]
        missing = [k for k in heads if k not in state]
        if missing:
            raise InvalidInput(f"{self.ctx.tier} adapters lack {len(missing)} tensors, e.g. {missing[0]}")
        out.update({k: state[k] for k in heads})
        return {k: nn.Parameter(v.detach().clone()) for k, v in out.items()}

    def frozen(self) -> str:
        """The suffix of the part of M frozen this round."""
        return SHARED if phase(self.config, self.plan.round_id) == "task" else TASK

    def bound(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in params.items() if not k.endswith((SHARED, TASK, A_SUFFIX))}
        for module in self.modules:
            out[module + A_SUFFIX] = (params[module + SHARED] + params[module + TASK]) @ params[module + A_SUFFIX]
        return out

    def after_backward(self, params: dict[str, nn.Parameter]) -> None:
        for key, p in params.items():
            if key.endswith(self.frozen()):
                p.grad = None  # AdamW leaves a tensor without a gradient as it is

    def pack_update(self, params: dict[str, nn.Parameter]) -> AdapterState:
        """Keep A, B and M_task here; send the sparsified M_shared in a shared phase, and any head."""
        private = self.ctx.store[PRIVATE][self.plan.user_id]
        out: AdapterState = {}
        for key, p in params.items():
            if key.endswith((A_SUFFIX, B_SUFFIX, TASK)):
                private[key] = p.detach().clone()
            elif key.endswith(SHARED):
                if phase(self.config, self.plan.round_id) == "shared":
                    module = key[: -len(SHARED)]
                    keep = self.config.keep_of(p.shape[0], self.ctx.shapes[module + A_SUFFIX][0])
                    out.update(sparse(p.detach(), self.start[module], keep, module))
            else:
                out[key] = p.detach().clone()
        return out


class H2TuneStrategy(Strategy):
    config: H2TuneConfig
    owned_suffixes = (M,)

    @classmethod
    def check_request(cls, config: AlgorithmConfig, request: RoundConfig, spec: ModelSpec, num_layers: int) -> None:
        if spec.adapter != "lora":
            raise InvalidInput(f"h2tune trains LoRA adapters (B M A): this deployment uses adapter '{spec.adapter}'")

    def _rank(self) -> int:
        return self.ctx.spec.lora.rank if self.ctx.spec is not None else 0

    def pack_download(self, tier: Tier, state: AdapterState, round_id: int) -> AdapterState:
        """Only what is shared: middle matrices and heads (A and B never leave the tier that trains them)."""
        return {k: v for k, v in state.items() if module_of(k) is None or k.endswith(M)}

    def validate_update(self, tier: Tier, state: AdapterState, previous: AdapterState, source: str) -> None:
        check_upload(state, previous, max((i.spec.lora.rank for i in self.ctx.models.values()), default=self._rank()),
                     source)

    def aggregate(self, tier: Tier, updates: list[AdapterUpdate], previous: AdapterState) -> AdapterState:
        """An edge's pre-aggregate of its users: per module, the weighted sum and weight of every entry (dense, at
        the deployment's rank); heads averaged."""
        rank = self._rank()
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for u in updates:
            for module, (total, w) in dense_parts(u.state, float(u.num_samples), defaultdict(lambda: rank)).items():
                old = sums.get(module)
                sums[module] = (total, w) if old is None else (old[0] + total, old[1] + w)
        out = _heads(updates)
        for module, (total, w) in sums.items():
            out[module + MEAN], out[module + WEIGHT] = total / w.clamp_min(1e-12), w
        return out

    def aggregate_round(self, updates: Mapping[Tier, list[AdapterUpdate]], previous: AdapterBundle) -> AdapterBundle:
        """Every module's M_shared from its alignment slot's mean over every deployment and tier."""
        where = {module_of(k): (t, int(v.shape[0])) for t in TIERS for k, v in previous[t].items() if k.endswith(A_SUFFIX)}
        slot_of_module = self._slots(where)
        big = max((r for _, r in where.values()), default=1)
        slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for tier_updates in updates.values():
            for u in tier_updates:
                parts = dense_parts(u.state, float(u.num_samples), {m: r for m, (_, r) in where.items()})
                for module, (total, w) in parts.items():
                    s = slot_of_module[module]
                    old = slots.get(s, (torch.zeros(big, big), torch.zeros(big, big)))
                    r = total.shape[0]
                    old[0][:r, :r] += total
                    old[1][:r, :r] += w
                    slots[s] = old
        new = {t: dict(previous[t]) for t in TIERS}
        for module, (tier, r) in where.items():
            if slot_of_module[module] not in slots:
                continue
            total, w = (x[:r, :r] for x in slots[slot_of_module[module]])
            m = previous[tier].get(module + M, torch.eye(r))
            new[tier][module + M] = torch.where(w > 0, total / w.clamp_min(1e-12), m)
        heads = _heads([u for tier_updates in updates.values() for u in tier_updates])
        for key, value in heads.items():
            tier = next(t for t in TIERS if key in previous[t])
            new[tier][key] = value
        return AdapterBundle(new)

    def __init__(self, config: AlgorithmConfig, ctx: StrategyContext) -> None:
        super().__init__(config, ctx)
        self._mapped: dict[str, tuple[list[int], int]] | None = None  # similarity alignment, once worked out

    def before_round(self, round_id: int, global_state: AdapterBundle) -> AdapterBundle:
        """Similarity alignment is worked out before anyone trains: a model that cannot be probed fails the round
        then, not after its training."""
        if self.config.alignment == "similarity":
            self._reference_map()
        return super().before_round(round_id, global_state)

    def _slots(self, where: Mapping[str, tuple[Tier, int]]) -> dict[str, tuple[int, int]]:
        models = sorted(self.ctx.models.values(), key=lambda i: -len(i.prefix))
        slots = self.config.slots or min((i.num_layers for i in models), default=1)
        mapped = self._reference_map() if self.config.alignment == "similarity" else {}
        out: dict[str, tuple[int, int]] = {}
        for info in models:
            mine = [m for m in where if m.startswith(info.prefix) and m not in out]
            order = module_orders(mine, info.prefix)
            out.update({m: slot_of(m, info.prefix, info.num_layers, slots, order, mapped.get(info.prefix))
                        for m in mine})
        return out

    def _reference_map(self) -> dict[str, tuple[list[int], int]]:
        """``_to_reference``, worked out once per strategy (per round)."""
        if self._mapped is None:
            self._mapped = self._to_reference()
        return self._mapped

    def _to_reference(self) -> dict[str, tuple[list[int], int]]:
        """Similarity alignment: each deployment's (block -> block of the reference model, the reference's depth),
        by its prefix (the probe's Gram matrices are computed once per model and process)."""
        infos = list(self.ctx.models.values())
        if len(infos) < 2:
            return {}
        if any(info.source is None for info in infos):
            raise InvalidInput("h2tune: alignment 'similarity' needs each deployment's model files at the cloud")
        grams = {info.prefix: probe_grams(info.source, info.spec.tokenizer) for info in infos}
        depth = min(len(g) for g in grams.values())
        return {prefix: (blocks, depth) for prefix, blocks in similarity_map(grams).items()}


def _heads(updates: list[AdapterUpdate]) -> AdapterState:
    """Each head tensor's sample-weighted mean over the updates that hold it."""
    sums: dict[str, tuple[torch.Tensor, float]] = {}
    for u in updates:
        for key, value in u.state.items():
            if module_of(key) is None:
                total, w = sums.get(key, (torch.zeros_like(value, dtype=torch.float32), 0.0))
                sums[key] = (total + value.to(torch.float32) * u.num_samples, w + u.num_samples)
    return {k: total / max(w, 1e-12) for k, (total, w) in sums.items()}


H2TUNE = register_algorithm("h2tune", config=H2TuneConfig, strategy=H2TuneStrategy, session=H2TuneSession)
