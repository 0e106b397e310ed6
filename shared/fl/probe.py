"""H2Tune's relation-guided layer alignment by representation similarity (``"alignment": "similarity"``).

A model's blocks are compared with another model's by the representations they produce on one shared
probe batch (``PROBE``: fixed public sentences, no client data), tokenised by each model's own tokenizer:

* each block's output hidden states are mean-pooled over the tokens of each sentence (n x d, d the model's
  width) and summarised as their Gram matrix (n x n: independent of the width, so models of any hidden
  size compare);
* two blocks' similarity is debiased linear CKA (centred kernel alignment with the unbiased HSIC estimator)
  of their Gram matrices: 1 for representations equal up to a rotation, a scale and an offset, near 0 for
  unrelated ones;
* every block of a model maps to a block of the reference model (the shallowest; ties by name) by the
  monotone assignment (non-decreasing in depth) of largest total CKA, exact by dynamic programming, and then
  to that reference block's slot.

The Gram matrices are computed from the frozen pretrained weights, once per model per process, by whoever
holds the whole model's files (the cloud, which resolves each deployment's model source): the probe is
public text and the weights are the public base model, so nothing of a client's is involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shared.data.batching import collate
from shared.data.datasets import Example
from shared.model.partition import Split, load_partition
from shared.model.sources import ModelSource

PROBE = (
    "The meeting was moved to Thursday afternoon because the room was booked.",
    "How many kilometres is it from Paris to Berlin by train?",
    "I loved this film; the acting was superb and the music even better.",
    "Congratulations! You have won a free cruise, reply now to claim your prize.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Who wrote the novel that begins with a man waking up as an insect?",
    "Stock prices fell sharply after the company reported lower earnings.",
    "What a waste of two hours, the plot made no sense at all.",
    "Please remember to bring your passport and a copy of the booking.",
    "The river flooded the valley after a week of heavy rain.",
    "Can you call me back when you get this message? It is about dinner.",
    "The committee approved the new budget by a narrow margin.",
    "What is the boiling point of water at the top of a mountain?",
    "An honest, warm and funny story that stays with you for days.",
    "Our team lost the final match in the last minute of extra time.",
    "The telescope captured images of a galaxy millions of light years away.",
    "Where can I find a pharmacy that is open late on Sundays?",
    "Your account has been suspended; click the link below to verify your details.",
    "The soup was cold and the waiter never came back to our table.",
    "Researchers found that the new vaccine reduced infections by half.",
    "She planted tomatoes, beans and sunflowers along the garden fence.",
    "Which planet in our solar system has the most moons?",
    "I'll be ten minutes late, save me a seat near the window.",
    "A clumsy sequel that forgets everything that made the original charming.",
    "The bridge will be closed for repairs until the end of the month.",
    "When did the first person walk on the moon?",
    "Free entry into our weekly draw, text WIN to this number now.",
    "The orchestra played the symphony with remarkable precision and warmth.",
    "Heavy snow delayed flights across the north of the country.",
    "Thanks for the lovely evening, let's do it again soon.",
    "The old library holds manuscripts from the twelfth century.",
    "Honestly one of the most boring books I have ever tried to finish.",
)


def gram(x: torch.Tensor) -> torch.Tensor:
    """The (n, n) float64 linear Gram matrix of n row vectors (any width)."""
    x = x.to(torch.float64)
    return x @ x.T


def _hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator of two Gram matrices (Song et al., 2012); needs n >= 4."""
    n = k.shape[0]
    k, l = k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l))
    ones = torch.ones(n, dtype=k.dtype)
    return ((k * l).sum() + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2 * (ones @ k @ l @ ones) / (n - 2)) / (n * (n - 3))


def cka(k: torch.Tensor, l: torch.Tensor) -> float:
    """Debiased linear CKA of two Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), with the unbiased HSIC.
    Plain CKA is inflated towards 1 when the width exceeds the number of probes (here 384 or 576 against 32);
    the unbiased estimator is not. Invariant to rotations, scale and offsets of either side; 0 where either
    side does not vary."""
    norm = float(_hsic(k, k) * _hsic(l, l))
    return float(_hsic(k, l)) / norm**0.5 if norm > 0 else 0.0


def monotone_match(similarity: torch.Tensor) -> list[int]:
    """For each row i (a block of one model), a column j_i (a block of the reference) with j_0 <= j_1 <= ...,
    maximising the total similarity (exact dynamic programming; ties to the shallower column)."""
    rows, cols = similarity.shape
    best = torch.full((rows, cols), float("-inf"), dtype=torch.float64)
    best[0] = similarity[0].to(torch.float64)
    for i in range(1, rows):
        prefix = torch.cummax(best[i - 1], dim=0).values  # the best over columns <= j of the row above
        best[i] = prefix + similarity[i].to(torch.float64)
    out = [int(torch.argmax(best[-1]))]
    for i in range(rows - 1, 0, -1):
        j = out[0]
        out.insert(0, int(torch.argmax(best[i - 1][: j + 1])))
    return out


def similarity_map(grams: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, list[int]]:
    """Each model's blocks mapped to blocks of the reference model (the one with fewest blocks; ties by name),
    from every model's per-block Gram matrices on the probe."""
    reference = min(grams, key=lambda name: (len(grams[name]), name))
    ref = grams[reference]
    out = {}
    for name, mine in grams.items():
        if name == reference:
            out[name] = list(range(len(ref)))
            continue
        sim = torch.tensor([[cka(a, b) for b in ref] for a in mine], dtype=torch.float64)
        out[name] = monotone_match(sim)
    return out


_GRAMS: dict[tuple[str, str], list[torch.Tensor]] = {}  # (model directory, tokenizer) -> its blocks' Grams


def probe_grams(source: ModelSource, tokenizer: str = "", max_len: int = 64) -> list[torch.Tensor]:
    """The Gram matrix of each block's mean-pooled output on ``PROBE``, from the frozen base model (its
    embeddings and every block, loaded for this and released; once per model and process)."""
    key = (str(source.path), tokenizer)
    if key not in _GRAMS:
        _GRAMS[key] = _compute_grams(source, tokenizer, max_len)
    return _GRAMS[key]


def _compute_grams(source: ModelSource, tokenizer: str, max_len: int) -> list[torch.Tensor]:
    layers = source.num_layers
    part = load_partition(source, "user", Split(layers, layers, layers), "cls", 2)  # no head on this tier
    part.eval()
    batch = collate(source.tokenizer(tokenizer), [Example(text, 0) for text in PROBE], "cls", max_len)
    mask = batch.attention_mask
    weights = (mask / mask.sum(dim=1, keepdim=True)).unsqueeze(-1)
    out = []
    with torch.no_grad():
        hidden = part.embed_tokens(batch.input_ids, mask)
        for block in range(layers):
            hidden = part.run_blocks(hidden, mask, [block])
            out.append(gram((hidden * weights).sum(dim=1)))
    return out
