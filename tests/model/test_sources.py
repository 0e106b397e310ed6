"""Resolving a user's model directory: its family (or one line saying why not), a config that fails to build, and
its tokenizer (its own files, --tokenizer, or the byte-level fallback the output names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import ModelError
from shared.model.families import FAMILIES
from shared.model.sources import resolve_model
from shared.model.tokenizers import ByteTokenizer, HFTokenizer


def word_tokenizer(path: Path, words: list[str]) -> Path:
    """A real transformers tokenizer (a word-level tokenizer.json) with a small vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(str(path))
    return path


# --- the family, or one line ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["mamba", "no-such-architecture"])
def test_an_undescribed_family_is_one_line_with_the_supported_list_and_how_to_add_one(model_dir,
                                                                                      model_type: str) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model(str(model_dir(model_type=model_type)))
    message = str(err.value)
    assert "\n" not in message
    assert f"model type '{model_type}' is not described" in message
    assert "supported: " in message and all(t in message for t in FAMILIES)
    assert "README.md, 'Adding a family'" in message


def test_a_config_without_model_type_says_so(model_dir) -> None:
    with pytest.raises(ModelError, match="has no model_type; supported: .*llama"):
        resolve_model(str(model_dir(model_type=None)))


@pytest.mark.parametrize("patch, must_say", [
    ({"hidden_act": "no_such_activation"}, ["fails to build its causal-LM class", "KeyError", "no_such_activation"]),
    ({"rope_parameters": {"rope_type": "yarn"}}, ["does not make a llama config", "factor"]),
    ({"num_hidden_layers": "four"}, ["does not make a llama config", "num_hidden_layers"]),
])
def test_a_config_that_fails_to_build_is_one_line_naming_what_it_lacked(model_dir, patch, must_say) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model(str(model_dir(**patch)))
    assert "\n" not in str(err.value)
    for text in must_say:
        assert text in str(err.value)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_a_qwen2_or_mistral_directory_is_its_own_family(model_dir, model_type: str) -> None:
    """These were routed to the Llama classes and crashed on attributes their configs lack."""
    source = resolve_model(str(model_dir(base=f"tiny-{model_type}")))
    assert source.family is FAMILIES[model_type]


def test_a_family_without_the_data_sets_task_says_which_it_has(tiny) -> None:
    with pytest.raises(ModelError, match="bert models support classification only: use --data trec"):
        tiny("tiny-bert").family.require("lm")
    with pytest.raises(ModelError, match="cohere models support language modelling only: use --data shakespeare"):
        tiny("tiny-cohere").family.require("cls")


# --- tokenizers -------------------------------------------------------------------------------------


def test_a_directory_without_tokenizer_files_falls_back_to_bytes_and_says_so(model_dir) -> None:
    path = model_dir()
    tok = resolve_model(str(path)).tokenizer()
    assert isinstance(tok, ByteTokenizer)
    assert tok.origin.startswith(f"byte-level fallback: {path} has no tokenizer files (tokenizer.json")
    assert "--tokenizer" in tok.origin


def test_tokenizer_flag_takes_a_directory_or_byte(model_dir, tmp_path) -> None:
    source = resolve_model(str(model_dir()))
    words = word_tokenizer(tmp_path / "words", ["to", "be", "or", "not"])
    tok = source.tokenizer(str(words))
    assert isinstance(tok, HFTokenizer) and tok.origin == f"--tokenizer {words}"
    assert tok.encode("to be or not") == [4, 5, 6, 7]
    assert isinstance(source.tokenizer("byte"), ByteTokenizer)


def test_the_models_own_tokenizer_files_come_first(model_dir) -> None:
    path = model_dir()
    word_tokenizer(path, ["question"])
    tok = resolve_model(str(path)).tokenizer()
    assert isinstance(tok, HFTokenizer) and tok.origin == f"tokenizer.json in {path}"


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(model_dir, tmp_path) -> None:
    source = resolve_model(str(model_dir()))
    big = word_tokenizer(tmp_path / "big", [f"w{i}" for i in range(300)])
    with pytest.raises(ModelError, match=r"has 304 tokens, more than the model's vocabulary of 260"):
        source.tokenizer(str(big))


@pytest.mark.parametrize("files, must_say", [
    ({"tokenizer.json": "not json"}, ["cannot load the tokenizer in", "(found tokenizer.json)", "--tokenizer"]),
    ({"vocab.json": json.dumps({"a": 0})}, ["(found vocab.json)", "missing merges.txt"]),
])
def test_broken_tokenizer_files_are_named(model_dir, files: dict[str, str], must_say: list[str]) -> None:
    path = model_dir()
    for name, text in files.items():
        (path / name).write_text(text)
    with pytest.raises(ModelError) as err:
        resolve_model(str(path)).tokenizer()
    assert "\n" not in str(err.value)
    for text in must_say:
        assert text in str(err.value)


def test_a_small_vocabulary_without_tokenizer_files_names_the_files_it_looked_for(model_dir) -> None:
    """No room for the fallback's 260 byte ids: the error names the missing files and the flag."""
    base = resolve_model(str(model_dir()))
    small = base.config.__class__.from_dict({**base.config.to_dict(), "vocab_size": 100})
    with pytest.raises(ModelError, match=r"has no tokenizer files \(none of tokenizer.json, tokenizer.model.*"
                                         r"pass --tokenizer NAME_OR_DIR"):
        type(base)(base.name, base.path, base.family, small).tokenizer()


def test_tokenizer_flag_takes_a_tiny_or_a_directory_without_files_says_so(model_dir, tmp_path) -> None:
    source = resolve_model(str(model_dir()))
    assert isinstance(source.tokenizer("tiny-gpt2"), ByteTokenizer)  # a tiny model's byte tokenizer
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty has no tokenizer files \(none of tokenizer.json.*\): pass --tokenizer"):
        source.tokenizer(str(tmp_path / "empty"))
