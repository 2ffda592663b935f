"""Merging requests of different lengths gives each request what it would get alone."""

import numpy as np
import pytest

from export.io_spec import load_io_spec
from serving.errors import InputError
from serving.onnx_runner import OnnxRunner, sequence_axis
from serving.tokenize import TextTokenizer


@pytest.fixture(scope="module")
def parts(fake_runs):
    export = fake_runs["sentiment"] / "onnx"
    spec = load_io_spec(export)
    backbone = OnnxRunner(export / "backbone.onnx", spec.backbone.inputs, spec.backbone.outputs)
    adapter = OnnxRunner(export / "adapter.onnx", spec.adapter.inputs, spec.adapter.outputs)
    tok = TextTokenizer(export / "tokenizer", spec.max_length, spec.tokenizer_outputs)
    return spec, backbone, adapter, tok


def test_sequence_axes(parts):
    spec = parts[0]
    assert [sequence_axis(t) for t in spec.backbone.outputs] == [2, None]
    assert [sequence_axis(t) for t in spec.backbone.inputs] == [1] * len(spec.backbone.inputs)


def test_merged_run_equals_separate_runs(parts):
    spec, backbone, adapter, tok = parts
    feeds = [
        tok(["short"]),
        tok(["a much longer request with many more tokens", "and a second row"]),
        tok(["mid length text"]),
    ]
    for f in feeds:
        backbone.check(f)
    alone = [backbone.run([f])[0] for f in feeds]
    merged = backbone.run(feeds)
    for a, m in zip(alone, merged):
        assert m["hidden_states"].shape == a["hidden_states"].shape  # cut back to the request's (B, K, T, D)
        for name in a:
            np.testing.assert_allclose(m[name], a[name], atol=1e-6)
    adapter_feeds = [
        {"hidden_states": s["hidden_states"], "cls_states": s["cls_states"], "attention_mask": f["attention_mask"]}
        for s, f in zip(alone, feeds)
    ]
    logits_alone = [adapter.run([f])[0]["logits"] for f in adapter_feeds]
    logits_merged = [r["logits"] for r in adapter.run(adapter_feeds)]
    for a, m in zip(logits_alone, logits_merged):
        np.testing.assert_allclose(m, a, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "must be int64"),
        (lambda f: f.update(input_ids=f["input_ids"][0]), "must have shape"),
        (lambda f: f.update(attention_mask=f["attention_mask"][:, :-1]), "sequence length"),
        (lambda f: f.update(attention_mask=np.concatenate([f["attention_mask"]] * 2)), "batch size"),
        (lambda f: f.pop("token_type_ids"), "token_type_ids is missing"),
    ],
)
def test_check_refuses_malformed_feeds(parts, mutate, message):
    _, backbone, _, tok = parts
    feed = tok(["some text here"])
    mutate(feed)
    with pytest.raises(InputError, match=message):
        backbone.check(feed)


def test_runner_refuses_spec_that_does_not_match_graph(fake_runs):
    export = fake_runs["sentiment"] / "onnx"
    spec = load_io_spec(export)
    with pytest.raises(ValueError, match="no tensors named"):
        OnnxRunner(export / "adapter.onnx", spec.backbone.inputs, spec.backbone.outputs)
