"""Partitioning: split validation, what each tier holds and reads, tied heads, parameter bytes, for every family."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from shared.model.families import FAMILIES
from shared.model.sources import ModelError, tiny_config
from shared.model.partition import (TIERS, Split, build_partition, checkpoint_index, head_trainable_names, layout,
                                    load_partition, normalise)

L = 4  # blocks of every tiny model
MODELS = [f"tiny-{t}" for t in FAMILIES]  # a tiny random checkpoint of every described family
FIRST = ["tiny-llama", "tiny-gpt2", "tiny-bert"]  # checked at more split points
NUM_LABELS = {"lm": 0, "cls": 3}

# Written independently of the library's name maps: which checkpoint tensors a tier needs.
_BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.")
_EMBED_KEY = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embeddings|embeddings_project|embed_in)\.")
_TOKEN_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|embed_in|word_embeddings)\.weight$")


def task_of(model: str) -> str:
    return FAMILIES[model[len("tiny-"):]].tasks[0]  # lm where the family has an LM head, else cls


@functools.cache
def uses_pooler(model: str) -> bool:
    """Whether transformers' own classifier of this encoder reads the pooler (BERT) or not (RoBERTa's <s> head)."""
    from shared.lab.verify import whole_model
    from shared.model.sources import resolve_model

    return any(".pooler." in n for n, _ in whole_model(resolve_model(model), "cls", 3).named_parameters())


def owners(model: str, key: str, split: Split) -> set[str]:
    """The tiers that need checkpoint tensor ``key``."""
    if m := _BLOCK_KEY.search(key):
        return {split.tier_of_layer(int(m.group(1)))}
    if task_of(model) == "lm" and tiny_config(model).tie_word_embeddings and _TOKEN_EMBEDDING.search(key):
        return {"user", "cloud"}  # the embedding, and the LM head tied to it
    if _EMBED_KEY.search(key):
        return {"user"}
    if ".pooler." in f".{key}" and not uses_pooler(model):
        return set()
    return {"cloud"}  # final norm, an untied LM head, the pooler


@functools.cache
def loaded(model: str, tier: str, split: tuple[int, int]):
    """A tier's partition of a tiny model, loaded once for the tests that only look at it."""
    from shared.model.sources import resolve_model

    task = task_of(model)
    return load_partition(resolve_model(model), tier, Split(*split, L), task, NUM_LABELS[task])


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

HOLD_CASES = [(m, s) for m in FIRST for s in [(1, 3), (0, 4), (2, 2), (4, 4)]] + \
    [(m, (1, 3)) for m in MODELS if m not in FIRST]


@pytest.mark.parametrize("model, split", HOLD_CASES, ids=[f"{m}-{a},{b}" for m, (a, b) in HOLD_CASES])
def test_partition_holds_exactly_its_blocks(tiny, model: str, split: tuple[int, int]) -> None:
    source, s = tiny(model), Split(*split, L)
    for tier in TIERS:
        part = loaded(model, tier, split)
        assert part.layer_ids == list(s.layers(tier))
        assert sorted(part.blocks.keys(), key=int) == [str(i) for i in s.layers(tier)]
        assert (part.embed is not None) == (tier == "user")
        assert (part.head is not None) == (tier == "cloud")
        for name, p in part.named_parameters():
            assert tier_of(name, s) == tier, name
            assert p.device.type == "cpu" and not p.requires_grad, name
        # no rotary tensors travel: a tier with blocks rebuilds the tables from the config
        assert (part.rotary is not None) == bool(source.family.rotary and part.layer_ids)


@pytest.mark.parametrize("model", MODELS)
def test_partitions_together_are_the_whole_model(tiny, model: str) -> None:
    """Every parameter of transformers' own whole model sits, with the same value, on the tier that owns it."""
    from shared.lab.verify import whole_model

    source, split, task = tiny(model), Split(1, 3, L), task_of(model)
    parts = {t: dict(loaded(model, t, (1, 3)).named_parameters()) for t in TIERS}
    new_head = set(head_trainable_names(loaded(model, "cloud", (1, 3))))
    whole = whole_model(source, task, NUM_LABELS[task])
    modules = layout(source.family, whole, task)
    matched = set()
    for name, p in whole.named_parameters():
        norm = normalise(name, modules)
        if norm in new_head:
            continue  # a fresh classification head: initialised, not loaded
        tier = tier_of(norm, split)
        assert norm in parts[tier], f"{name} -> {norm} is not on the {tier} tier"
        assert torch.equal(parts[tier][norm], p.detach()), norm
        matched.add((tier, norm))
    extra = {(t, n) for t, ps in parts.items() for n in ps} - matched
    if task == "lm" and source.config.tie_word_embeddings:  # the head's copy of the tied embedding
        assert extra == {("cloud", f"head.{source.family.lm_head}.weight")}
    else:  # the fresh classification head, if any
        assert extra == {("cloud", n) for n in new_head}


READ_CASES = [(m, s, t) for m in MODELS for s in [(1, 3)] for t in TIERS] + \
    [(m, (2, 2), t) for m in FIRST for t in TIERS]


@pytest.mark.parametrize("model, split, tier", READ_CASES, ids=[f"{m}-{a},{b}-{t}" for m, (a, b), t in READ_CASES])
def test_partition_reads_only_its_own_tensors(tiny, monkeypatch, model: str, split: tuple[int, int], tier: str) -> None:
    source, s = tiny(model), Split(*split, L)
    checkpoint = list(checkpoint_index(source))
    reads = TensorReads(monkeypatch)
    load_partition(source, tier, s, task_of(model), NUM_LABELS[task_of(model)])
    expected = sorted(k for k in checkpoint if tier in owners(model, k, s))
    assert sorted(reads.keys) == expected  # each of its own tensors once, nothing of another tier


@pytest.mark.parametrize("model", [m for m in MODELS if task_of(m) == "lm" and tiny_config(m).tie_word_embeddings])
def test_tied_lm_head_is_the_embedding_matrix(tiny, model: str) -> None:
    from safetensors import safe_open

    source = tiny(model)
    assert source.config.tie_word_embeddings is True
    with safe_open(str(source.weight_files()[0]), framework="pt") as f:
        (ckpt_name,) = [k for k in f.keys() if _TOKEN_EMBEDDING.search(k)]
        embedding = f.get_tensor(ckpt_name)
    cloud = dict(loaded(model, "cloud", (1, 3)).named_parameters())
    user = dict(loaded(model, "user", (1, 3)).named_parameters())
    assert torch.equal(cloud[f"head.{source.family.lm_head}.weight"], embedding)
    assert torch.equal(user[f"embed.{source.family.embed[0]}.weight"], embedding)


BYTES_CASES = [(m, s) for m in FIRST for s in [(1, 3), (0, 4), (2, 2), (4, 4), (0, 0)]] + \
    [(m, s) for m in MODELS if m not in FIRST for s in [(1, 3), (0, 0)]]


@pytest.mark.parametrize("model, split", BYTES_CASES, ids=[f"{m}-{a},{b}" for m, (a, b) in BYTES_CASES])
def test_parameter_bytes_are_the_bytes_of_the_assigned_tensors(tiny, model: str, split: tuple[int, int]) -> None:
    """Memory is exact: a tier's parameter bytes are the bytes of the checkpoint tensors assigned to it (plus a
    fresh classification head on the cloud), and the tiers together hold the whole checkpoint once (plus the
    tied head's copy of the embedding)."""
    source, s, task = tiny(model), Split(*split, L), task_of(model)
    parts = {t: loaded(model, t, split) for t in TIERS}
    shapes = checkpoint_shapes(source)
    new_head = sum(p.numel() * 4 for n, p in parts["cloud"].named_parameters() if n in head_trainable_names(parts["cloud"]))
    assert (new_head > 0) == (task == "cls")
    for tier in TIERS:
        assigned = nbytes(v for k, v in shapes.items() if tier in owners(model, k, s))
        assert parts[tier].parameter_bytes() == assigned + (new_head if tier == "cloud" else 0), tier
    block = [nbytes(v for k, v in shapes.items() if (m := _BLOCK_KEY.search(k)) and int(m.group(1)) == i) for i in range(L)]
    assert len(set(block)) == 1 and block[0] > 0
    assert parts["edge"].parameter_bytes() == (s.b - s.a) * block[0]
    unused = nbytes(v for k, v in shapes.items() if not owners(model, k, s))
    tied = nbytes(v for k, v in shapes.items() if len(owners(model, k, s)) == 2)
    assert sum(p.parameter_bytes() for p in parts.values()) == nbytes(shapes.values()) - unused + tied + new_head


def test_build_partition_is_meta_and_loads_nothing(tiny, monkeypatch) -> None:
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("build_partition read the checkpoint"))
    part = build_partition(tiny("tiny-llama"), "edge", Split(1, 3, L), "lm")
    assert part.layer_ids == [1, 2]
    assert all(p.is_meta for p in part.parameters())
