"""Labelled text data: built-in datasets (training/datasets.py) or a user CSV/JSONL file, one fixed
stratified split, batches.

Decisions:
- Exact duplicates are kept, but the split puts identical texts in one split so that no test text is
  also a train text.
- Classification or regression (`data.task_type`): `auto` reads a label column whose values are all
  numbers, at least one of them not an integer, as regression (one score per row, STS-B style);
  integer labels stay classes. Regression splits are stratified by score decile.
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

import csv
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

from contracts.task_names import task_name_from_file
from training.config import DataConfig

from .datasets import BUILTIN, DataError, load_builtin

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass
class Example:
    text: str
    text_pair: str | None
    label: int | float  # a class index, or a score for regression


@dataclass
class DatasetSplits:
    name: str
    labels: list[str]  # index -> label string; ["score"] for regression (one output)
    text_pair: bool
    train: list[Example]
    val: list[Example]
    test: list[Example]
    task_type: str = "classification"  # classification | regression


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
            f"{path}: line {line}: byte {raw[e.start : e.start + 1]!r} cannot be decoded as {encoding}; "
            f"set data.encoding to the file's encoding (e.g. data.encoding=latin-1)"
        ) from e
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
        raise DataError(
            f"data.dataset={cfg.dataset!r}: not a built-in dataset {list(BUILTIN)} "
            f"and not a file ending in {list(SUFFIXES)}"
        )
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
            raise DataError(
                f"label {names[c]!r} has {n} row(s); every class needs at least 3 "
                f"(one each for train, val and test): add rows or drop the class"
            )
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
            raise DataError(
                f"label {names[c]!r} has only {len(groups)} distinct texts in {n} rows: "
                f"too few to give train, val and test one each; add rows or lower the fractions"
            )
    test, val, train = splits
    return sorted(train), sorted(val), sorted(test)


def task_type_of(raw_labels: list[str], wanted: str, where: str) -> str:
    """`wanted` if explicit; auto: regression when every label is a number and one is not an integer."""

    def number(v: str) -> bool:
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False

    numeric = all(number(v) for v in raw_labels)
    if wanted == "regression" and not numeric:
        bad = next(v for v in raw_labels if not number(v))
        raise DataError(f"{where}: data.task_type=regression needs numeric labels; found {bad!r}")
    if wanted != "auto":
        return wanted
    return "regression" if numeric and any(not float(v).is_integer() for v in raw_labels) else "classification"


def _score_deciles(scores: list[float]) -> list[int]:
    """Each score's decile (0-9): the strata a regression split is stratified by."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    strata = [0] * len(scores)
    for rank, i in enumerate(order):
        strata[i] = min(9, rank * 10 // max(len(scores), 1))
    return strata


def load_splits(cfg: DataConfig) -> DatasetSplits:
    """Read the configured dataset and split it once, the same way on every run and machine."""
    if cfg.dataset in BUILTIN:
        texts, pairs, raw_labels, builtin_type = load_builtin(cfg.dataset)
        if cfg.text_pair_column is not None and pairs is None:
            raise DataError(f"data.text_pair_column is set, but {cfg.dataset} has single texts: unset it")
        pairs = pairs if pairs is not None else [None] * len(texts)
        name, task_type = cfg.dataset, builtin_type if cfg.task_type == "auto" else cfg.task_type
        task_type_of(raw_labels, task_type, cfg.dataset)
    else:
        texts, pairs, raw_labels = _user_file(cfg)
        name = task_name_from_file(cfg.dataset)  # a valid served task name, decided before training
        task_type = task_type_of(raw_labels, cfg.task_type, cfg.dataset)
    if task_type == "regression":
        values = [float(v) for v in raw_labels]
        labels, strata, strata_names = ["score"], _score_deciles(values), [f"score decile {i + 1}" for i in range(10)]
    else:
        labels = _label_order(raw_labels)
        if len(labels) < 2:
            raise DataError(
                f"{cfg.dataset}: column {cfg.label_column!r} holds only {labels}; "
                f"a classifier needs at least 2 distinct labels"
            )
        values = strata = encode_labels(raw_labels, labels, cfg.dataset)
        strata_names = labels
    rows = list(range(len(values)))
    if cfg.max_examples is not None and cfg.max_examples < len(values):
        rows = _subsample(strata, len(strata_names), cfg.max_examples, cfg.split_seed)
    keys = [(texts[i], pairs[i]) for i in rows]
    train, val, test = _split([strata[i] for i in rows], keys, strata_names, cfg)

    def examples(positions: list[int]) -> list[Example]:
        return [Example(texts[rows[p]], pairs[rows[p]], values[rows[p]]) for p in positions]

    return DatasetSplits(
        name, labels, any(p is not None for p in pairs), examples(train), examples(val), examples(test), task_type
    )


def describe(splits: DatasetSplits) -> str:
    """One log line: split sizes and per-label counts (score range for regression)."""
    rows = [e.label for part in (splits.train, splits.val, splits.test) for e in part]
    if splits.task_type == "regression":
        per_label = f"score in [{min(rows):g}, {max(rows):g}] (regression)"
    else:
        counts = Counter(rows)
        per_label = ", ".join(f"{name}={counts[i]}" for i, name in enumerate(splits.labels))
    pair = " (text pairs)" if splits.text_pair else ""
    return (
        f"{splits.name}{pair}: train {len(splits.train)}, val {len(splits.val)}, "
        f"test {len(splits.test)}; labels {per_label}"
    )


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
        enc = self.tokenizer(
            texts, pairs, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}  # (B, T)
        regression = isinstance(batch[0].label, float)
        out["labels"] = torch.tensor(
            [e.label for e in batch], dtype=torch.float32 if regression else torch.int64
        )  # (B,)
        return out


def make_loader(
    examples: list[Example],
    tokenizer,
    max_length: int,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    pad_to_max_length: bool = False,
    sampler=None,
) -> DataLoader:
    """Batches of token tensors; a seeded generator (or `sampler`, e.g. a rank's shard) fixes the order."""
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        generator=generator,
        sampler=sampler,
        collate_fn=_Collate(tokenizer, max_length, pad_to_max_length),
        num_workers=0,
    )
