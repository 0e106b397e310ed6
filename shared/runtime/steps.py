"""What every tier runs: its partition with LoRA, per-session replicas and optimizers, the hooks."""

from __future__ import annotations


import torch



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
