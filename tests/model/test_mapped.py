"""The frozen token embedding on a memory map of its file, its rows read from the file: the same outputs and updates
as a copy, and none of the mapped matrix resident after a step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from shared.config.deployment import ModelSpec
from shared.model import partition as partition_module
from shared.model.mapped import StoredRowsEmbedding
from shared.model.sources import resolve_model
from shared.protocol.messages import RoundPlan
from shared.runtime.tier import TierRuntime


def stored_as(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    """A copy of a tiny checkpoint with its float tensors stored in ``dtype`` (a bf16 checkpoint from the hub, say)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for file in src.iterdir():
        if file.suffix == ".safetensors":
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
            save_file(state, str(dest / file.name), metadata={"format": "pt"})
        else:
            (dest / file.name).write_bytes(file.read_bytes())
    return dest


def mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files mapped where ``tensor``'s data lies (from /proc/self/maps)."""
    ptr = tensor.data_ptr()
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            low, high = (int(x, 16) for x in parts[0].split("-"))
            if low <= ptr < high and len(parts) >= 6:
                found.append(parts[5])
    return found


def user_step(source, task: str, split: tuple[int, int]) -> tuple[TierRuntime, torch.Tensor, dict[str, torch.Tensor]]:
    """A user tier's forward output and its adapters after one training step on fixed tokens."""
    spec = ModelSpec(model=str(source.path), split=split, task=task, num_labels=2 if task == "cls" else 0)
    torch.manual_seed(0)  # peft's initial adapters, LoRA dropout
    runtime = TierRuntime("user", source, spec)
    session = runtime.open_session(RoundPlan(round_id=1, user_id="u", local_steps=1, batch_size=2, lr=1e-2),
                                   runtime.global_state_template())
    ids = torch.randint(0, int(source.config.vocab_size), (2, 8), generator=torch.Generator().manual_seed(1))
    out = runtime.forward(session, None, torch.ones_like(ids), 0, input_ids=ids)
    runtime.backward_and_step(session, [out], [torch.linspace(-1, 1, out.numel()).view_as(out)])
    return runtime, out.detach(), {k: v.detach().clone() for k, v in session.params.items()}


def token_embedding(runtime: TierRuntime) -> torch.nn.Embedding:
    vocab = int(runtime.source.config.vocab_size)
    return next(m for m in runtime.partition.embed.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == vocab)


def copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load as before: every tensor copied out of its file."""
    monkeypatch.setattr(partition_module, "map_token_embedding", lambda *args, **kwargs: None)


def resident_kb(tensor: torch.Tensor) -> int:
    """Resident kB of the mapping (from /proc/self/smaps) where ``tensor``'s data lies."""
    ptr, inside, rss = tensor.data_ptr(), False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= ptr < high
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


def reads_rows(embedding: torch.nn.Embedding) -> bool:
    """Its lookups read rows from its file (``FileRows``) rather than index the weight."""
    rows = getattr(embedding, "file_rows", None)
    return rows is not None and rows.serves(embedding.weight)


CASES = [  # model, stored dtype (None: as the tiny checkpoint has it, fp32), task, split, rows read from the file
    ("tiny-llama", None, "lm", (1, 3), True),
    ("tiny-llama", torch.bfloat16, "lm", (1, 3), True),
    ("tiny-gpt2", torch.float16, "lm", (2, 3), True),
    ("tiny-bert", torch.bfloat16, "cls", (1, 3), True),  # nested: embeddings.word_embeddings
    ("tiny-gemma3_text", torch.bfloat16, "lm", (1, 3), False),  # a scaled-embedding subclass: copied and cast
    ("tiny-gemma3_text", None, "lm", (1, 3), False),  # fp32: mapped and indexed as it is
]


@pytest.mark.parametrize(("model", "dtype", "task", "split", "rows_read"), CASES)
def test_mapped_embedding_gives_the_copied_outputs_and_updates(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               model: str, dtype, task: str, split, rows_read: bool) -> None:
    path = tiny(model).path if dtype is None else stored_as(tiny(model).path, tmp_path / "stored", dtype)
    source = resolve_model(str(path))
    runtime, out, params = user_step(source, task, split)
    embedding = token_embedding(runtime)
    assert isinstance(embedding, StoredRowsEmbedding) is rows_read and reads_rows(embedding) is rows_read
    assert embedding.weight.dtype == (dtype or torch.float32 if rows_read else torch.float32)
    if dtype is None or rows_read:
        assert any(f.endswith(".safetensors") for f in mapped_files(embedding.weight)), "not read through a map"
    if rows_read:  # the step read its rows from the file: not a page of the mapped matrix is resident
        assert resident_kb(embedding.weight) == 0
    assert runtime.step_limits(next(iter(runtime.sessions.values()))).dtype == torch.float32
    copied(monkeypatch)
    runtime_c, out_c, params_c = user_step(source, task, split)
    assert not isinstance(token_embedding(runtime_c), StoredRowsEmbedding)
    assert out.dtype == out_c.dtype == torch.float32
    assert torch.equal(out, out_c)
    assert params.keys() == params_c.keys() and all(torch.equal(params[k], params_c[k]) for k in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_read_from_the_file_are_the_rows_indexed(tiny, tmp_path: Path, dtype) -> None:
    """Ids repeated, consecutive runs, the first and last rows, any shape: the rows indexing the weight gives."""
    source = resolve_model(str(stored_as(tiny("tiny-llama").path, tmp_path / "stored", dtype)))
    runtime = TierRuntime("user", source, ModelSpec(model=str(source.path), split=(1, 3), task="lm"))
    embedding = token_embedding(runtime)
    n = embedding.num_embeddings
    cases = [torch.tensor([[0, 1, 2, 3, n - 1]]), torch.tensor([5, 5, 7, 6, 5, n - 2, n - 1, 0]),
             torch.randint(0, n, (3, 4, 9), generator=torch.Generator().manual_seed(2)), torch.zeros(2, 0, dtype=torch.long)]
    got = [embedding(ids) for ids in cases]
    assert resident_kb(embedding.weight) == 0  # nothing indexed the mapped matrix
    for ids, rows in zip(cases, got):
        expected = torch.nn.functional.embedding(ids, embedding.weight).to(torch.float32)
        assert rows.shape == expected.shape and rows.dtype == torch.float32 and torch.equal(rows, expected)
    with pytest.raises(IndexError):  # out of range: the ordinary lookup's error
        embedding(torch.tensor([[1, n]]))
    twin = copy.deepcopy(embedding)  # its weight a copy in memory: indexed, the same rows
    assert twin.file_rows is None and torch.equal(twin(cases[2]), got[2])


def test_a_write_to_the_mapped_embedding_stays_in_the_process(tiny, tmp_path: Path) -> None:
    path = stored_as(tiny("tiny-llama").path, tmp_path / "copy", torch.float32)
    before = (path / "model.safetensors").read_bytes()
    source = resolve_model(str(path))
    runtime, _, _ = user_step(source, "lm", (1, 3))
    weight = runtime.partition.embed["embed_tokens"].weight
    ids = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        weight.add_(1.0)  # copy-on-write: this process's pages only
    assert (path / "model.safetensors").read_bytes() == before
    module = runtime.partition.embed["embed_tokens"]
    assert not reads_rows(module)  # written: lookups index the weight, and see the write
    assert torch.equal(module(ids), weight[ids])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_device_holding_the_tied_head_too_gets_the_copied_outputs(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   dtype) -> None:
    """U-shaped, the whole model on the device (a = b = L): the embedding is mapped, the head it is tied to still
    computes in fp32 and gives the copied load's logits and updates."""
    path = tiny("tiny-llama").path if dtype is None else stored_as(tiny("tiny-llama").path, tmp_path / "stored", dtype)
    source = resolve_model(str(path))
    assert source.config.tie_word_embeddings
    n = int(source.config.num_hidden_layers)

    def whole_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = ModelSpec(model=str(source.path), split=(n, n), task="lm", u_shaped=True)
        torch.manual_seed(0)
        runtime = TierRuntime("user", source, spec)
        session = runtime.open_session(RoundPlan(round_id=1, user_id="u", local_steps=1, batch_size=2, lr=1e-2),
                                       runtime.global_state_template())
        ids = torch.randint(0, int(source.config.vocab_size), (2, 8), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        logits = runtime.head(session, runtime.forward(session, None, mask, 0, input_ids=ids), mask)
        runtime.backward_and_step(session, [logits], [torch.linspace(-1, 1, logits.numel()).view_as(logits)])
        return logits.detach(), {k: v.detach().clone() for k, v in session.params.items()}

    logits, params = whole_step()
    copied(monkeypatch)
    logits_c, params_c = whole_step()
    assert logits.dtype == torch.float32 and torch.equal(logits, logits_c)
    assert params.keys() == params_c.keys() and all(torch.equal(params[k], params_c[k]) for k in params)
