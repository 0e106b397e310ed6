"""Tokenised batches from a client's examples, deterministic under (seed, round, user)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shared.data.datasets import Example
from shared.model.tokenizers import Tokenizer
from shared.seeds import derive_seed

IGNORE_INDEX = -100
EVAL_BATCH_SIZE = 32  # examples per evaluation step (a serving tier takes no more rows in one, nor above batch_size in training)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S) int64
    attention_mask: torch.Tensor  # (B, S) int64, 1 = token, 0 = padding (right padding)
    labels: torch.Tensor  # (B, S) int64 with IGNORE_INDEX at padding (lm), or (B,) int64 (cls)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def split(self, count: int) -> list["Batch"]:
        """``count`` micro-batches of consecutive rows (sizes differing by at most one; at most one per row)."""
        parts = min(count, self.size)
        if parts <= 1:
            return [self]
        ids, masks, labels = (t.tensor_split(parts) for t in (self.input_ids, self.attention_mask, self.labels))
        return [Batch(*rows) for rows in zip(ids, masks, labels)]

def collate(tokenizer: Tokenizer, examples: list[Example], task: str, max_len: int, pad_to_max: bool = False) -> Batch:
    """Tokenise, truncate to ``max_len`` and right-pad to the longest row (or to ``max_len``: fixed shapes)."""
    rows = [tokenizer.encode(e.text)[:max_len] for e in examples]
    rows = [r if r else [tokenizer.pad_id] for r in rows]
    width = max_len if pad_to_max else max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
    if task == "lm":
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    else:
        labels = torch.tensor([int(e.label) for e in examples], dtype=torch.int64)
    return Batch(ids, mask, labels)


class BatchSampler:
    """Training batches: a fresh shuffle of the client's train set per round, cycled as needed."""

    def __init__(self, tokenizer: Tokenizer, examples: list[Example], task: str, max_len: int,
                 pad_to_max: bool = False) -> None:
        if not examples:
            raise ValueError("a client needs at least one training example")
        self.tokenizer, self.examples, self.task, self.max_len = tokenizer, examples, task, max_len
        self.pad_to_max = pad_to_max

    def round_batches(self, seed: int, round_id: int, user_id: str, steps: int, batch_size: int) -> Iterator[Batch]:
        """The round's batches, made one at a time (a long round never holds them all)."""
        rng = random.Random(derive_seed(seed, round_id, user_id, "batches"))
        order: list[int] = []
        for i in range(steps):
            while len(order) < batch_size:
                chunk = list(range(len(self.examples)))
                rng.shuffle(chunk)
                order.extend(chunk)
            picked, order = order[:batch_size], order[batch_size:]
            yield collate(self.tokenizer, [self.examples[j] for j in picked], self.task, self.max_len, self.pad_to_max)

def eval_batches(tokenizer: Tokenizer, examples: list[Example], task: str, max_len: int, batch_size: int) -> list[Batch]:
    return [collate(tokenizer, examples[i:i + batch_size], task, max_len) for i in range(0, len(examples), batch_size)]
