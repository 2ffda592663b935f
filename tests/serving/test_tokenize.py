"""serving.tokenize against the Hugging Face tokenizer the export saved."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from serving.errors import InputError
from serving.tokenize import TextTokenizer, decode_texts

NAMES = ("input_ids", "attention_mask", "token_type_ids")
TEXTS = ["a short one", "a noticeably longer sentence about a film that was really quite charming", "ok"]


@pytest.fixture(scope="module")
def tok_dir(fake_runs):
    return fake_runs["sentiment"] / "onnx" / "tokenizer"


def _hf(tok_dir, texts, pairs=None, max_length=32):
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    return hf(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="np")


@pytest.mark.parametrize("max_length", [8, 32])
def test_matches_hugging_face_single(tok_dir, max_length):
    ours = TextTokenizer(tok_dir, max_length, NAMES)(TEXTS)
    ref = _hf(tok_dir, TEXTS, max_length=max_length)
    for name in NAMES:
        assert ours[name].dtype == np.int64
        np.testing.assert_array_equal(ours[name], ref[name])


def test_matches_hugging_face_pairs(tok_dir):
    pairs = ["the second text", "x", "another fairly long second segment that will need truncating " * 3]
    ours = TextTokenizer(tok_dir, 24, NAMES)(TEXTS, pairs)
    ref = _hf(tok_dir, TEXTS, pairs, max_length=24)
    for name in NAMES:
        np.testing.assert_array_equal(ours[name], ref[name])


def test_pads_to_longest_and_truncates(tok_dir):
    out = TextTokenizer(tok_dir, 16, NAMES)(["tiny", "word " * 100])
    assert out["input_ids"].shape == (2, 16)  # truncated, not an error
    short = TextTokenizer(tok_dir, 16, NAMES)(["tiny", "two words"])
    assert short["input_ids"].shape[1] < 16  # padded to the longest, not to max_length


def test_outputs_only_the_backbone_inputs(tok_dir):
    out = TextTokenizer(tok_dir, 16, NAMES[:2])(["tiny"])
    assert set(out) == set(NAMES[:2])
    with pytest.raises(ValueError, match="position_ids"):
        TextTokenizer(tok_dir, 16, ("input_ids", "position_ids"))


def test_decode_texts_accepts_utf8():
    raw = np.array([["héllo".encode()], [b"plain"]], dtype=object)
    assert decode_texts(raw, "text") == ["héllo", "plain"]


@pytest.mark.parametrize(
    "raw, message",
    [
        (np.array([[b""]], dtype=object), r"text\[0\] is empty"),
        (np.array([[b"ok"], [b"   "]], dtype=object), r"text\[1\] is empty"),
        (np.array([[b"\xff\xfe bad"]], dtype=object), r"text\[0\] is not valid UTF-8"),
        (np.array([b"a", b"b"], dtype=object), r"shape \(batch, 1\)"),
        (np.array([[1]], dtype=object), "must be a string"),
    ],
)
def test_decode_texts_refuses_bad_input(raw, message):
    with pytest.raises(InputError, match=message):
        decode_texts(raw, "text")
