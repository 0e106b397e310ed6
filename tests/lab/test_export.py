"""``splitllm export``: a committed version as a PEFT adapter directory that plain transformers + peft load, giving
the split model's logits; from a cloud's data directory offline and from a running cloud over HTTP."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch
from safetensors.torch import load_file

from cloud_server.store import Store
from shared.config.deployment import Experiment
from shared.config.round import RoundConfig
from shared.lab.cluster import Proc, free_port
from shared.lab.credentials import provision
from shared.lab.export import ExportError, from_data_dir, main
from shared.lab.sim import SimConfig, Simulation
from shared.protocol.enums import Mode, Tier
from shared.protocol.messages import RoundPlan
from shared.runtime.steps import pack_tokens, unpack_tokens

CASES = {"tiny-bert/trec": ("tiny-bert", "trec", "lora"), "tiny-llama/shakespeare": ("tiny-llama", "shakespeare", "lora"),
         "tiny-gpt2/shakespeare": ("tiny-gpt2", "shakespeare", "lora"),
         "tiny-bert/trec/fedara": ("tiny-bert", "trec", "svd")}  # FedARA's SVD form: peft's AdaLoRA
TEXTS = ["To be, or not to be, that is the question.", "What films featured the character Popeye Doyle?",
         "Ok lar... Joking wif u oni..."]


def trained(case: str) -> Simulation:
    model, data, adapter = CASES[case]
    algorithm = {"algorithm": "fedara", "config": {"target_rank": 4}} if adapter == "svd" else {}
    sim = Simulation(SimConfig(model=model, data=data, users=2, edges=1, rounds=1, split=(1, 3), max_len=32,
                               max_examples_per_client=16, eval_examples_per_client=4, seed=3, baseline_eval=False,
                               adapter=adapter,
                               round=RoundConfig(local_steps=3, batch_size=4, lr=0.05, evaluate=False, **algorithm)))
    sim.run()
    return sim


def data_dir_of(sim: Simulation, path) -> None:
    """A cloud's data directory holding the simulation's versions 0 and 1 and its deployment, as a cloud writes it."""
    store = Store(path)
    store.put_setting("experiment", Experiment(sim.spec, sim.data_spec).to_meta())
    record = sim.coordinator.rounds[1].to_dict()
    store.save_round({**record, "version": None, "state": "running"})
    store.commit(record, sim.coordinator.global_state)
    store.close()


def batch(sim: Simulation) -> tuple[torch.Tensor, torch.Tensor]:
    tok = sim.source.tokenizer()
    ids = [tok.encode(t)[:24] for t in TEXTS]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.uint8)
    return input_ids, mask


def split_logits(sim: Simulation, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The split model's evaluation forward: the three tiers' partitions, only real tokens crossing each cut."""
    plan = RoundPlan(round_id=99, user_id="export-test", local_steps=1, batch_size=len(TEXTS), lr=0.0, mode=Mode.EVAL)
    state = sim.coordinator.global_state
    sessions = {t: sim.runtimes[t].open_session(plan, state[t]) for t in Tier}
    try:
        rows = pack_tokens(sim.runtimes[Tier.USER].forward(sessions[Tier.USER], None, mask, 0, input_ids=input_ids), mask)
        rows = pack_tokens(sim.runtimes[Tier.EDGE].forward(sessions[Tier.EDGE], unpack_tokens(rows, mask), mask, 0), mask)
        cloud = sim.runtimes[Tier.CLOUD]
        with torch.no_grad():
            return cloud.head(sessions[Tier.CLOUD], cloud.forward(sessions[Tier.CLOUD], unpack_tokens(rows, mask), mask, 0),
                              mask)
    finally:
        for t in Tier:
            sim.runtimes[t].close_session(99, "export-test")


@pytest.mark.parametrize("case", list(CASES))
def test_plain_peft_gives_the_split_models_logits(case: str, tmp_path, hermetic_cache) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sim = trained(case)
    data_dir_of(sim, tmp_path / "cloud")
    assert main(["--data-dir", str(tmp_path / "cloud"), "--version", "1", "--out", str(tmp_path / "peft")]) == 0
    out = tmp_path / "peft"
    config = json.loads((out / "adapter_config.json").read_text())
    info = json.loads((out / "splitllm.json").read_text())
    assert config["peft_type"] == ("ADALORA" if info["adapter"] == "svd" else "LORA")
    assert config["base_model_name_or_path"] == info["base_model"]
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert len([k for k in keys if ".lora_" in k]) == sum(
        1 for state in sim.coordinator.global_state.values() for k in state if ".lora_" in k)
    if info["task"] == "cls":
        assert config["task_type"] == "SEQ_CLS" and info["label_names"] == sim.dataset.label_names
        base = AutoModelForSequenceClassification.from_pretrained(info["base_model"], num_labels=info["num_labels"])
        assert any("classifier" in k or "score" in k for k in keys), "the trained head is in the adapter"
    else:
        assert config["task_type"] == "CAUSAL_LM"
        base = AutoModelForCausalLM.from_pretrained(info["base_model"])
    model = PeftModel.from_pretrained(base, str(out)).eval()
    input_ids, mask = batch(sim)
    with torch.no_grad():
        theirs = model(input_ids=input_ids, attention_mask=mask).logits
    ours = split_logits(sim, input_ids, mask)
    if info["task"] == "lm":  # the positions of real tokens
        theirs, ours = theirs[mask.bool()], ours[mask.bool()]
    assert theirs.shape == ours.shape
    assert float((theirs - ours).abs().max()) < 1e-5
    # and the adapters did train: the plain base model without them answers differently
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=input_ids, attention_mask=mask).logits
    plain = plain[mask.bool()] if info["task"] == "lm" else plain
    assert float((plain - ours).abs().max()) > 1e-3


def test_export_from_a_running_cloud_equals_the_offline_export(tmp_path, hermetic_cache, monkeypatch) -> None:
    creds = provision(tmp_path / "credentials", [], {})
    env = {**os.environ, **creds.env("cloud")}
    cloud = Proc("cloud", ["cloud", "--data-dir", str(tmp_path / "cloud"), "--model", "tiny-bert", "--split", "1,3",
                           "--data", "trec", "--num-clients", "2", "--max-examples-per-client", "16"],
                 free_port(), tmp_path / "cloud.log")
    cloud.start(env)
    try:
        cloud.wait_healthy()
        r = httpx.get(f"{cloud.url}/v1/adapters/0", timeout=30)
        assert r.status_code == 401  # the adapters need an admin's credential
        assert main(["--cloud", cloud.url, "--out", str(tmp_path / "none")]) == 2
        monkeypatch.setenv("SPLITLLM_ADMIN_TOKEN", creds.admin_token)  # the default of --admin-token
        assert main(["--cloud", cloud.url, "--out", str(tmp_path / "online")]) == 0  # the current version: 0
        assert main(["--cloud", cloud.url, "--admin-token", f"@{tmp_path / 'credentials' / 'admin.token'}",
                     "--out", str(tmp_path / "by-file")]) == 0
    finally:
        cloud.kill()
    assert main(["--data-dir", str(tmp_path / "cloud"), "--version", "0", "--out", str(tmp_path / "offline")]) == 0
    online = load_file(str(tmp_path / "online" / "adapter_model.safetensors"))
    offline = load_file(str(tmp_path / "offline" / "adapter_model.safetensors"))
    assert online.keys() == offline.keys() and all(torch.equal(online[k], offline[k]) for k in online)
    assert (tmp_path / "online" / "adapter_config.json").read_text() == \
        (tmp_path / "offline" / "adapter_config.json").read_text()


def test_bad_sources_are_one_line_errors(tmp_path, capsys) -> None:
    assert main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a cloud's data directory" in capsys.readouterr().err
    store = Store(tmp_path / "old")
    store.close()
    with pytest.raises(ExportError, match="does not record its deployment"):
        from_data_dir(tmp_path / "old", None)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, hermetic_cache) -> None:
    """The README's export command and its Python block, run in a directory whose runs/cloud is a cloud's data
    directory after a minilm-l6 round on trec (the README's services)."""
    import ast
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Exporting a version"):]
    command = re.search(r"^splitllm export (.*?)\s+#", section, re.M).group(1).split()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    sim = Simulation(SimConfig(model="minilm-l6", data="trec", users=2, edges=1, rounds=1, split=(1, 3),
                               max_examples_per_client=16, eval_examples_per_client=4, baseline_eval=False,
                               round=RoundConfig(local_steps=2, batch_size=4, evaluate=False)))
    sim.run()
    data_dir_of(sim, tmp_path / "runs" / "cloud")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-m", "shared.lab.cli", "export", *command], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    labels = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # the printed list of two label names
    assert len(labels) == 2 and set(labels) <= set(sim.dataset.label_names)
