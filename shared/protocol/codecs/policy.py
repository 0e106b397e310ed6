"""Sender-side codec choices: CodecPolicy (a spec per kind of traffic) and ErrorFeedback (top-k residuals)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from shared.protocol.codecs.spec import CodecSpec
from shared.protocol.codecs.topk import resolve_k, topk_dense


@dataclass
class CodecPolicy:
    """Which codec spec each kind of traffic uses; every field is validated with CodecSpec.parse."""

    activations: str = "fp32"
    gradients: str = "fp32"
    uploads: str = "fp32"
    downloads: str = "fp32"

    def __setattr__(self, key: str, value: Any) -> None:
        if key in _POLICY_FIELDS:
            if isinstance(value, CodecSpec):
                value = str(value)
            if not isinstance(value, str):
                raise ValueError(f"codec policy {key!r} must be a codec spec str, got {type(value).__name__}")
            try:
                CodecSpec.parse(value)
            except ValueError as e:
                raise ValueError(f"codec policy {key!r}: {e}") from None
        super().__setattr__(key, value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> CodecPolicy:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"codec policy must be a mapping, got {type(d).__name__}")
        extra = sorted(set(d) - set(_POLICY_FIELDS))
        if extra:
            raise ValueError(f"codec policy: unknown field(s) {', '.join(map(repr, extra))} (fields: {', '.join(_POLICY_FIELDS)})")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in _POLICY_FIELDS}

    def spec(self, field_name: str) -> CodecSpec:
        if field_name not in _POLICY_FIELDS:
            raise ValueError(f"codec policy has no field {field_name!r} (fields: {', '.join(_POLICY_FIELDS)})")
        return CodecSpec.parse(getattr(self, field_name))


_POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CodecPolicy))


# ---------------------------------------------------------------------------------------------
# Error feedback (sender side, for sparsified gradients)
# ---------------------------------------------------------------------------------------------


class ErrorFeedback:
    """Per-key residuals for top-k sparsification at the sender.

    ``compress(key, g, k)`` adds the stored residual to ``g``, keeps the k largest magnitudes and
    returns that sparse-as-dense tensor (``g``'s dtype, shape and device: exactly what the receiver
    reconstructs when it is sent with ``topk:k=<k>`` and the same ``values``), storing
    ``residual = (g + old_residual) - sent``. Residuals are kept in float32 (float64 for float64
    inputs). A residual whose shape or device no longer matches the key's tensor is dropped.
    """

    def __init__(self) -> None:
        self._residuals: dict[Any, torch.Tensor] = {}

    def compress(
        self,
        key: Any,
        tensor: torch.Tensor,
        k: int | None = None,
        *,
        ratio: float | None = None,
        values: str = "fp32",
    ) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError("ErrorFeedback.compress needs a floating torch.Tensor")
        kk = resolve_k(tensor.numel(), k, ratio)
        acc_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        acc = tensor.detach().to(acc_dtype, copy=True)
        old = self._residuals.get(key)
        if old is not None and old.shape == acc.shape and old.device == acc.device:
            acc += old
        sent = topk_dense(acc, kk, values).to(tensor.dtype)
        self._residuals[key] = acc - sent.to(acc_dtype)
        return sent

    def residual(self, key: Any) -> torch.Tensor | None:
        return self._residuals.get(key)

    def reset(self, key: Any = None) -> None:
        """Forget one key's residual, or all of them."""
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def __contains__(self, key: Any) -> bool:
        return key in self._residuals

    def __len__(self) -> int:
        return len(self._residuals)
