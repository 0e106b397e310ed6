"""Partitioning and adapters: split validation, what each tier holds and reads, tied heads, adapter keys."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from shared.model.adapters import initial_state
from shared.fl import RoundPlan
from shared.data.batching import collate
from shared.data.datasets import Example
from shared.model.sources import ByteTokenizer, ModelError, tiny_config
from shared.model.families import FAMILIES
from shared.model.partition import (TIERS, Split, _checkpoint_index, build_partition, head_trainable_names, load_partition)
from shared.config.model_spec import ModelSpec
from shared.runtime.tier import TierRuntime, adapter_shapes
from shared.protocol.transport import InProcessLink
from user_agent.compute import step_message

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
def test_partitions_together_are_the_whole_model(tiny, model: str) -> None:
    """Every parameter of transformers' own whole model sits, with the same value, on the tier that owns it."""
    from shared.lab.verify import _whole_model

    source, split, task = tiny(model), Split(1, 3, L), TASK[model]
    parts = {t: dict(load_partition(source, t, split, task, NUM_LABELS[task]).named_parameters()) for t in TIERS}
    family = FAMILIES[source.family]
    whole = _whole_model(source, task, NUM_LABELS[task])
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
    checkpoint = list(_checkpoint_index(source))
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


# --- what crosses between tiers --------------------------------------------------------------------


def test_step_message_carries_only_hidden_mask_and_labels() -> None:
    batch = collate(ByteTokenizer(), [Example("ab"), Example("abcdef")], "lm", 16)
    hidden = torch.randn(2, batch.input_ids.shape[1], 32)
    msg = step_message(RoundPlan(round_id=3, user_id="u"), 5, hidden, batch)
    assert set(msg.tensors) == {"hidden", "attention_mask", "labels"}
    assert msg.tensors["attention_mask"].dtype == torch.uint8
    assert msg.meta == {"round": 3, "user": "u", "step": 5, "mode": "train"}


def test_step_chain_carries_no_rotary_or_position_tensors(small_sim, monkeypatch) -> None:
    """Every step message of a real round, both hops, both phases: activations, mask, labels down; grads back."""
    seen: list[tuple[str, set[str], set[str]]] = []
    real = InProcessLink.request

    def spy(self, endpoint, msg):
        reply = real(self, endpoint, msg)
        if endpoint == "step":
            seen.append((msg.meta["mode"], set(msg.tensors), set(reply.tensors)))
        return reply

    monkeypatch.setattr(InProcessLink, "request", spy)
    small_sim().run_round()
    assert {m for m, _, _ in seen} == {"train", "eval"}
    for mode, sent, returned in seen:
        assert sent == {"hidden", "attention_mask", "labels"}
        assert returned == ({"grad"} if mode == "train" else set())


# --- adapters --------------------------------------------------------------------------------------

ADAPTER_CASES = [("tiny-llama", "lm", (1, 3)), ("tiny-gpt2", "lm", (0, 2)), ("tiny-bert", "cls", (1, 3)),
                 ("tiny-llama", "cls", (2, 4)), ("tiny-bert", "cls", (4, 4))]


def _spec(model: str, task: str, split: tuple[int, int]) -> ModelSpec:
    return ModelSpec(model=model, split=split, task=task, num_labels=NUM_LABELS[task])


@pytest.mark.parametrize("model, task, split", ADAPTER_CASES)
def test_adapter_keys_are_normalised_and_the_same_from_meta_and_loaded(tiny, model, task, split) -> None:
    source, s = tiny(model), Split(*split, L)
    family = FAMILIES[source.family]
    spec = _spec(model, task, split)
    meta = adapter_shapes(source, spec)
    all_keys: list[str] = []
    for tier in TIERS:
        runtime = TierRuntime(tier, source, spec)
        assert runtime.slots.shapes() == meta[tier], tier
        assert runtime.slots.keys == sorted(meta[tier])
        for key in meta[tier]:
            assert ".default" not in key and key.startswith(("blocks.", "head.")), key
            assert tier_of(key, s) == tier, key
            if key.startswith("blocks."):
                assert re.search(r"\.lora_[AB]\.weight$", key), key
                assert any(f".{t}.lora_" in key for t in family.lora_targets), key
            else:
                assert task == "cls" and key in NEW_HEAD["cls"], key
        all_keys += meta[tier]
    assert len(all_keys) == len(set(all_keys)) > 0  # unique across tiers: blocks carry global indices
    n_lora = sum(k.startswith("blocks.") for k in all_keys)
    assert n_lora == 2 * L * len(family.lora_targets)


def test_adapter_shapes_loads_nothing(tiny, monkeypatch) -> None:
    import safetensors

    source = tiny("tiny-llama")
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("adapter_shapes read the checkpoint"))
    shapes = adapter_shapes(source, _spec("tiny-llama", "lm", (1, 3)))
    assert set(shapes) == set(TIERS) and all(shapes.values())


def test_lora_shapes_follow_rank(tiny) -> None:
    shapes = adapter_shapes(tiny("tiny-llama"), _spec("tiny-llama", "lm", (1, 3)))
    flat = {k: v for t in shapes.values() for k, v in t.items()}
    assert flat["blocks.0.self_attn.q_proj.lora_A.weight"] == (8, 32)
    assert flat["blocks.0.self_attn.q_proj.lora_B.weight"] == (32, 8)
    assert flat["blocks.3.self_attn.k_proj.lora_B.weight"] == (16, 8)  # 2 key/value heads of 8


def _flat_shapes(tiny, model, task, split) -> dict[str, tuple[int, ...]]:
    shapes = adapter_shapes(tiny(model), _spec(model, task, split))
    return {k: v for t in shapes.values() for k, v in t.items()}


def test_initial_state_is_deterministic_per_key(tiny) -> None:
    shapes = _flat_shapes(tiny, "tiny-bert", "cls", (1, 3))
    state = initial_state(shapes, seed=7)
    again = initial_state(shapes, seed=7)
    other_seed = initial_state(shapes, seed=8)
    for key, shape in shapes.items():
        assert torch.equal(state[key], again[key]), key
        alone = initial_state({key: shape}, seed=7)[key]  # made without any other key
        assert torch.equal(alone, state[key]), key
        if ".lora_B." not in key and not key.endswith(".bias"):
            assert not torch.equal(other_seed[key], state[key]), key


def test_initial_state_does_not_depend_on_the_tier_that_makes_it(tiny) -> None:
    """Blocks 1 and 2 sit on the edge with split 1,3 and on the user with split 3,3: same initial tensors."""
    tiers_13 = adapter_shapes(tiny("tiny-llama"), _spec("tiny-llama", "lm", (1, 3)))
    tiers_33 = adapter_shapes(tiny("tiny-llama"), _spec("tiny-llama", "lm", (3, 3)))
    on_edge = initial_state(tiers_13["edge"], seed=0)
    on_user = initial_state(tiers_33["user"], seed=0)
    assert on_edge and set(on_edge) <= set(on_user)
    for key, value in on_edge.items():
        assert torch.equal(value, on_user[key]), key


def test_initial_values_lora_b_zero_a_bounded_head_small(tiny) -> None:
    shapes = _flat_shapes(tiny, "tiny-bert", "cls", (1, 3))
    state = initial_state(shapes, seed=0)
    for key, value in state.items():
        assert tuple(value.shape) == shapes[key] and value.dtype == torch.float32
        if ".lora_B." in key or key.endswith(".bias"):
            assert torch.count_nonzero(value) == 0, key
        elif ".lora_A." in key:
            bound = 1 / math.sqrt(value.shape[1])
            assert 0 < value.abs().max() <= bound, key
        else:
            assert key == "head.classifier.weight"
            assert 0.005 < float(value.std()) < 0.05


# --- memory ---------------------------------------------------------------------------------------

MEMORY_REPORT = """\
import json
from shared.lab.memory import memory_report
print(json.dumps(memory_report("smollm2-135m", (2, 15))))
"""


@pytest.mark.slow
def test_memory_report_smollm2_user_tier_is_small(run_cli) -> None:
    # Convert the GGUF in one process and report from a fresh, small one: a probe's peak RSS inherits its
    # parent's (see test_memory_probe_peak_rss_is_its_own), and this test process holds large models.
    convert = run_cli([], code="from shared.models import resolve_model; resolve_model('smollm2-135m')")
    assert convert.returncode == 0, convert.stderr[-2000:]
    proc = run_cli([], code=MEMORY_REPORT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: report[k] for k in ("user_param_share", "user_rss_saving_bytes", "user_bytes_not_held")},
          {t: report[t] for t in ("user", "edge", "cloud", "whole")})
    assert report["user_param_share"] <= 0.30
    assert report["user_rss_saving_bytes"] >= report["user_bytes_not_held"]


def test_memory_probe_peak_rss_is_its_own(tiny, run_cli) -> None:
    tiny("tiny-llama")
    ballast = torch.ones(2**28)  # 1 GiB, touched: this process's peak RSS is now above 1 GiB
    try:
        proc = run_cli(["tiny-llama", "1,3", "user", "2", "8"], module="shared.lab.memory")
    finally:
        del ballast
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["param_bytes"] > 0
    assert probe["peak_rss_bytes"] < 2**30  # a tiny-model probe really peaks at a few hundred MB
