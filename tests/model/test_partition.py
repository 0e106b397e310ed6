"""Partitioning: split validation, what each tier holds and reads, tied heads, parameter bytes."""

from __future__ import annotations

import math
import re

import pytest
import torch

from shared.model.sources import ModelError, tiny_config
from shared.model.families import FAMILIES
from shared.model.partition import (TIERS, Split, checkpoint_index, build_partition, head_trainable_names, load_partition)

L = 4  # blocks of every tiny model
TASK = {"tiny-llama": "lm", "tiny-gpt2": "lm", "tiny-bert": "cls"}
NUM_LABELS = {"lm": 0, "cls": 3}
# checkpoint name and normalised name of the embedding matrix the LM head is tied to
TIED = {"tiny-llama": ("model.embed_tokens.weight", "embed.embed_tokens.weight"),
        "tiny-gpt2": ("transformer.wte.weight", "embed.wte.weight")}
NEW_HEAD = {"lm": set(), "cls": {"head.classifier.weight", "head.classifier.bias", "head.score.weight"}}

_BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.")
_EMBED_KEY = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embeddings)\.")


def owners(model: str, key: str, split: Split) -> set[str]:
    """The tiers that need checkpoint tensor ``key`` (written independently of the library's name maps)."""
    if m := _BLOCK_KEY.search(key):
        return {split.tier_of_layer(int(m.group(1)))}
    if TASK[model] == "lm" and key == TIED.get(model, ("",))[0]:
        return {"user", "cloud"}  # the embedding, and the LM head tied to it
    if _EMBED_KEY.search(key):
        return {"user"}
    return {"cloud"}  # final norm, pooler


def tier_of(norm_name: str, split: Split) -> str:
    if norm_name.startswith("embed."):
        return "user"
    if norm_name.startswith("head."):
        return "cloud"
    return split.tier_of_layer(int(norm_name.split(".")[1]))


def checkpoint_shapes(source) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in source.weight_files():
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def nbytes(shapes) -> int:
    return sum(math.prod(s) * 4 for s in shapes)  # the tiny checkpoints are float32


class TensorReads:
    """Wraps ``safetensors.safe_open`` and records the name of every tensor read through it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors

        self.real, self.keys = safetensors.safe_open, []
        monkeypatch.setattr(safetensors, "safe_open", self.open)

    def open(self, *args, **kwargs):
        return _RecordingHandle(self.real(*args, **kwargs), self.keys)


class _RecordingHandle:
    def __init__(self, handle, reads: list[str]) -> None:
        self._handle, self._reads = handle, reads

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, name: str):
        self._reads.append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name: str):
        self._reads.append(name)
        return self._handle.get_slice(name)

    def __getattr__(self, attr: str):
        return getattr(self._handle, attr)



# --- split points ----------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [(3, 1), (1, 5), (5, 5), (-1, 2), (0, -1), (-2, -1)])
def test_split_out_of_range_names_the_range(a: int, b: int) -> None:
    with pytest.raises(ModelError, match=r"out of range: need 0 <= a <= b <= 4") as err:
        Split(a, b, L)
    assert f"a={a}, b={b}" in str(err.value)
    assert "the model has 4 blocks" in str(err.value)


@pytest.mark.parametrize("a, b", [(0, 0), (0, 4), (2, 2), (4, 4), (1, 3), (0, 2)])
def test_split_assigns_every_block_to_exactly_one_tier(a: int, b: int) -> None:
    split = Split(a, b, L)
    assert list(split.layers("user")) == list(range(a))
    assert list(split.layers("edge")) == list(range(a, b))
    assert list(split.layers("cloud")) == list(range(b, L))
    for i in range(L):
        assert i in split.layers(split.tier_of_layer(i))


@pytest.mark.parametrize("text", ["1", "1,2,3", "a,b", "", "1;3", "1.5,2"])
def test_split_parse_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ModelError, match="two integers"):
        Split.parse(text, L)


def test_split_parse() -> None:
    assert Split.parse("1,3", L) == Split(1, 3, L)
    with pytest.raises(ModelError, match="out of range"):
        Split.parse("3,1", L)


# --- what a partition holds ------------------------------------------------------------------------


@pytest.mark.parametrize("split", [(1, 3), (0, 4), (2, 2), (4, 4)])
@pytest.mark.parametrize("model", TASK)
def test_partition_holds_exactly_its_blocks(tiny, model: str, split: tuple[int, int]) -> None:
    source, s = tiny(model), Split(*split, L)
    task = TASK[model]
    for tier in TIERS:
        part = load_partition(source, tier, s, task, NUM_LABELS[task])
        assert part.layer_ids == list(s.layers(tier))
        assert sorted(part.blocks.keys(), key=int) == [str(i) for i in s.layers(tier)]
        assert (part.embed is not None) == (tier == "user")
        assert (part.head is not None) == (tier == "cloud")
        for name, p in part.named_parameters():
            assert tier_of(name, s) == tier, name
            assert p.device.type == "cpu" and not p.requires_grad, name
        if source.family == "llama":  # no rotary tensors travel: every tier rebuilds them from the config
            assert part.aux is not None


@pytest.mark.parametrize("model", TASK)
def test_partitions_together_are_thewhole_model(tiny, model: str) -> None:
    """Every parameter of transformers' own whole model sits, with the same value, on the tier that owns it."""
    from shared.lab.verify import whole_model

    source, split, task = tiny(model), Split(1, 3, L), TASK[model]
    parts = {t: dict(load_partition(source, t, split, task, NUM_LABELS[task]).named_parameters()) for t in TIERS}
    family = FAMILIES[source.family]
    whole = whole_model(source, task, NUM_LABELS[task])
    matched = set()
    for name, p in whole.named_parameters():
        norm = family.normalise(name)
        if norm in NEW_HEAD[task]:
            continue  # a fresh classification head: initialised, not loaded
        tier = tier_of(norm, split)
        assert norm in parts[tier], f"{name} -> {norm} is not on the {tier} tier"
        assert torch.equal(parts[tier][norm], p.detach()), norm
        matched.add((tier, norm))
    extra = {(t, n) for t, ps in parts.items() for n in ps} - matched
    if task == "lm":  # the head's copy of the tied embedding
        assert extra == {("cloud", "head.lm_head.weight")}
    else:  # the fresh classification head
        assert extra == {("cloud", "head.classifier.weight"), ("cloud", "head.classifier.bias")}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("split", [(1, 3), (2, 2)])
@pytest.mark.parametrize("model", TASK)
def test_partition_reads_only_its_own_tensors(tiny, monkeypatch, model: str, split: tuple[int, int], tier: str) -> None:
    source, s = tiny(model), Split(*split, L)
    checkpoint = list(checkpoint_index(source))
    reads = TensorReads(monkeypatch)
    load_partition(source, tier, s, TASK[model], NUM_LABELS[TASK[model]])
    expected = sorted(k for k in checkpoint if tier in owners(model, k, s))
    assert sorted(reads.keys) == expected  # each of its own tensors once, nothing of another tier


@pytest.mark.parametrize("model", TIED)
def test_tied_lm_head_is_the_embedding_matrix(tiny, model: str) -> None:
    from safetensors import safe_open

    source, split = tiny(model), Split(1, 3, L)
    assert tiny_config(model).tie_word_embeddings is True
    assert source.config.tie_word_embeddings is True
    ckpt_name, norm_name = TIED[model]
    with safe_open(str(source.weight_files()[0]), framework="pt") as f:
        embedding = f.get_tensor(ckpt_name)
    cloud = dict(load_partition(source, "cloud", split, "lm").named_parameters())
    user = dict(load_partition(source, "user", split, "lm").named_parameters())
    assert torch.equal(cloud["head.lm_head.weight"], embedding)
    assert torch.equal(user[norm_name], embedding)


@pytest.mark.parametrize("split", [(1, 3), (0, 4), (2, 2), (4, 4), (0, 0)])
@pytest.mark.parametrize("model", TASK)
def test_parameter_bytes_add_up_to_the_whole(tiny, model: str, split: tuple[int, int]) -> None:
    source, s, task = tiny(model), Split(*split, L), TASK[model]
    parts = {t: load_partition(source, t, s, task, NUM_LABELS[task]) for t in TIERS}
    shapes = checkpoint_shapes(source)
    whole = nbytes(shapes.values())
    block = [nbytes(v for k, v in shapes.items() if (m := _BLOCK_KEY.search(k)) and int(m.group(1)) == i) for i in range(L)]
    assert len(set(block)) == 1 and block[0] > 0
    embed = nbytes(v for k, v in shapes.items() if "user" in owners(model, k, s) and not _BLOCK_KEY.search(k))
    tied = nbytes([shapes[TIED[model][0]]]) if task == "lm" else 0
    new_head = sum(p.numel() * 4 for n, p in parts["cloud"].named_parameters() if n in head_trainable_names(parts["cloud"]))
    assert (new_head > 0) == (task == "cls")

    user, edge, cloud = (parts[t].parameter_bytes() for t in TIERS)
    assert user == embed + s.a * block[0]
    assert edge == (s.b - s.a) * block[0]
    assert user + edge + cloud == whole + tied + new_head
    assert all(0 <= x <= whole + new_head for x in (user, edge, cloud))


def test_build_partition_is_meta_and_loads_nothing(tiny, monkeypatch) -> None:
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("build_partition read the checkpoint"))
    part = build_partition(tiny("tiny-llama"), "edge", Split(1, 3, L), "lm")
    assert part.layer_ids == [1, 2]
    assert all(p.is_meta for p in part.parameters())
