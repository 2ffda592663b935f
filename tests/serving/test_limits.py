"""Bounds decided from the export: text bytes and content, id ranges and lengths, task names, max_length."""

import json

import numpy as np
import pytest

from contracts.artifacts import write_manifest
from export.io_spec import IO_SPEC_FILE, load_io_spec
from serving import model_config as mcfg
from serving.artifacts import load_run
from serving.config import ServeConfig
from serving.contract import check_task_name, task_name_from_file
from serving.errors import InputError
from serving.onnx_runner import InputLimits, OnnxRunner
from serving.tokenize import TextTokenizer, decode_texts
from tests.conftest import write_toy_csv
from training.backbone import load_encoder
from training.config import BackboneConfig, ConfigError, DataConfig
from training.data import load_splits


@pytest.fixture(scope="module")
def tok(fake_runs):
    spec = load_io_spec(fake_runs["nli"] / "onnx")
    return TextTokenizer(fake_runs["nli"] / "onnx" / "tokenizer", spec.max_length, spec.tokenizer_outputs)


@pytest.mark.parametrize("text", ["\u200b", "\x00", "\ufeff\u200f", "\ufffd", "\u0301", "\x01\x02", "\U000e0001"])
def test_contentless_text_is_refused(tok, text):
    with pytest.raises(InputError, match=r"text\[1\] has no content"):
        tok(["fine", text])
    with pytest.raises(InputError, match=r"text_pair\[0\] has no content"):
        tok(["fine"], [text])


def test_text_with_any_token_of_its_own_is_content(tok):
    assert tok(["\U0001f642", "a\u200bb"])["input_ids"].shape[0] == 2  # [UNK] is a token of the text


def test_text_bytes_are_bounded_before_decoding():
    raw = np.array([[b"ok"], [b"\xff" * 100]], dtype=object)  # not even UTF-8: the size is checked first
    with pytest.raises(InputError, match=r"text\[1\] is 100 bytes; the limit is 64 UTF-8 bytes"):
        decode_texts(raw, "text", 64)
    assert decode_texts(np.array([["é" * 32]], dtype=object), "text", 64) == ["é" * 32]  # 64 bytes exactly


@pytest.fixture(scope="module")
def backbone(fake_runs):
    run = load_run(fake_runs["sentiment"])
    limits = InputLimits(**run.input_limits("backbone"))
    return OnnxRunner(run.graph("backbone"), run.spec.backbone.inputs, run.spec.backbone.outputs, limits=limits)


def _feed(ids, mask=None, types=None):
    ids = np.array(ids, np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids) if mask is None else np.array(mask, np.int64),
        "token_type_ids": np.zeros_like(ids) if types is None else np.array(types, np.int64),
    }


def test_limits_come_from_the_export(fake_runs, backbone):
    assert backbone.limits == InputLimits(max_length=32, vocab_size=30522, type_vocab_size=2)
    assert load_run(fake_runs["sentiment"]).input_limits("adapter") == {"max_length": 32}


@pytest.mark.parametrize(
    "feed, message",
    [
        (_feed([[101, 30522, 102]]), r"input_ids\[0, 1\] = 30522 is outside \[0, 30522\)"),
        (_feed([[101, 102], [101, -1]]), r"input_ids\[1, 1\] = -1"),
        (_feed([[101, 102]], types=[[0, 2]]), r"token_type_ids\[0, 1\] = 2 is outside \[0, 2\)"),
        (_feed([[101, 102]], mask=[[1, -1]]), r"attention_mask\[0, 1\] = -1"),
        (_feed([[101, 102], [101, 102]], mask=[[1, 1], [0, 0]]), "attention_mask row 1 has no 1"),
        (_feed([[101] * 33]), r"sequence length 33 is outside \[1, 32\]"),
        (_feed(np.zeros((1, 0))), r"sequence length 0"),
        (_feed(np.zeros((0, 3))), "batch is empty"),
    ],
)
def test_backbone_feeds_outside_the_limits_are_refused(backbone, feed, message):
    with pytest.raises(InputError, match=message):
        backbone.check(feed)


def test_backbone_feeds_at_the_limits_pass(backbone):
    backbone.check(_feed([[0] + [30521] * 31], types=[[1] * 32]))


def test_configs_carry_queue_policy_limits_and_a_warmup_mask(fake_runs):
    run = load_run(fake_runs["sentiment"])
    cfg = ServeConfig(max_queue_size=7, queue_timeout_us=12345, allow_timeout_override=False, max_text_bytes=999)
    backbone = mcfg.onnx_python_config(
        "backbone", run.spec.backbone, cfg, 1, "backbone.onnx", run.input_limits("backbone")
    )
    tokenizer = mcfg.tokenizer_config("tokenizer", run.spec, cfg, "tokenizer")
    post = mcfg.postprocess_config("postprocess_sentiment", run.spec, cfg)
    for config in (backbone, tokenizer, post):
        policy = config.dynamic_batching.default_queue_policy
        assert (policy.max_queue_size, policy.default_timeout_microseconds, policy.allow_timeout_override) == (
            7,
            12345,
            False,
        )
        assert policy.timeout_action == policy.REJECT
    assert tokenizer.parameters["max_text_bytes"].string_value == "999"
    assert {k: v.string_value for k, v in backbone.parameters.items() if k in ("vocab_size", "max_length")} == {
        "vocab_size": "30522",
        "max_length": "32",
    }
    assert mcfg.graph_warmup_files(run.spec.backbone, cfg) == {
        "attention_mask": np.ones(cfg.warmup_seq_len, np.int64).tobytes()
    }


def test_io_spec_without_the_new_bounds_still_loads(fake_runs, tmp_path):
    import shutil

    export = shutil.copytree(fake_runs["sentiment"] / "onnx", tmp_path / "onnx")
    d = json.loads((export / IO_SPEC_FILE).read_text())
    for key in ("vocab_size", "type_vocab_size", "max_positions"):
        d.pop(key)
    (export / IO_SPEC_FILE).write_text(json.dumps(d))
    write_manifest(export, "onnx")
    assert load_io_spec(export).vocab_size is None and load_run(export).input_limits("backbone")["vocab_size"] == 30522
    d.update(vocab_size=1000, type_vocab_size=1, max_positions=16)
    (export / IO_SPEC_FILE).write_text(json.dumps(d))
    write_manifest(export, "onnx")
    assert load_run(export).input_limits("backbone") == {"max_length": 16, "vocab_size": 1000, "type_vocab_size": 1}


@pytest.mark.parametrize(
    "path, task",
    [
        ("data/my reviews.csv", "my_reviews"),
        ("x/reviews.csv", "reviews"),
        ("1st-try.jsonl", "task_1st-try"),
        ("backbone_x.csv", "task_backbone_x"),
        ("été.json", "t"),
        ("%%.csv", "task"),
        ("a" * 80 + ".csv", "a" * 64),
    ],
)
def test_task_names_from_data_files_are_valid(path, task):
    got = task_name_from_file(path)
    assert got == task and check_task_name(got) == got


def test_training_names_the_task_before_it_trains(tmp_path, caplog):
    data = write_toy_csv(tmp_path / "my reviews.csv", n=30)
    assert load_splits(DataConfig(dataset=data)).name == "my_reviews"
    assert "'my reviews' is not a valid task name" in caplog.text


def test_max_length_beyond_the_positions_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"backbone.max_length: 513 exceeds the 512 positions"):
        load_encoder(BackboneConfig(name="tiny", max_length=513), 30522)
