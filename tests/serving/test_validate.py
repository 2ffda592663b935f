"""A broken config or broken ensemble wiring is refused, naming the model and the field."""

import shutil

import pytest

from serving.config import ServeConfig
from serving.errors import RepositoryError
from serving.repository import generate_repository
from serving.validate import parse_config, validate_repository


@pytest.fixture
def repo(fake_runs, tmp_path):
    root = tmp_path / "repo"
    generate_repository([fake_runs["sentiment"], fake_runs["nli"]], root, ServeConfig(max_batch_size=8))
    return root


def _edit(path, old, new, count=1):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def test_generated_repository_is_valid(repo):
    models = validate_repository(repo)
    assert {
        "tokenizer_sentiment",
        "tokenizer_nli",
        "backbone",
        "adapter_sentiment",
        "postprocess_sentiment",
        "sentiment",
        "nli",
    } <= set(models)


def test_misspelled_field_is_refused_naming_model_and_field(repo):
    _edit(repo / "backbone" / "config.pbtxt", "max_batch_size", "max_batch_sise")
    with pytest.raises(RepositoryError, match=r"model 'backbone'.*max_batch_sise"):
        validate_repository(repo)


def test_wrong_name_is_refused(repo):
    _edit(repo / "adapter_nli" / "config.pbtxt", 'name: "adapter_nli"', 'name: "adapter_other"')
    with pytest.raises(RepositoryError, match=r"model 'adapter_nli': field 'name'"):
        parse_config(repo / "adapter_nli" / "config.pbtxt")


@pytest.mark.parametrize(
    "model, old, new, message",
    [
        (
            "sentiment",
            'model_name: "adapter_sentiment"',
            'model_name: "adapter_missing"',
            r"ensemble 'sentiment' step 2 \(adapter_missing\): field 'model_name'",
        ),
        (
            "sentiment",
            'value: "hidden_states"\n    }\n    output_map',
            'value: "hidden_state"\n    }\n    output_map',
            r"ensemble 'sentiment' step 2 \(adapter_sentiment\): input_map value 'hidden_state'",
        ),
        (
            "adapter_sentiment",
            "TYPE_FP32",
            "TYPE_FP16",
            r"ensemble 'sentiment' step 2 \(adapter_sentiment\): input 'hidden_states' is TYPE_FP16",
        ),
        ("backbone", "dims: 16", "dims: 17", r"ensemble '(nli|sentiment)' step 2 .*hidden_states"),
        (
            "postprocess_nli",
            'name: "probabilities"',
            'name: "probs"',
            r"ensemble 'nli'.*output_map key 'probabilities'",
        ),
        ("sentiment", 'key: "text"\n      value: "text"', 'key: "text"\n      value: "txt"', r"input_map value 'txt'"),
        ("tokenizer_nli", "max_batch_size: 8", "max_batch_size: 4", r"max_batch_size 4 is below the ensemble's 8"),
    ],
)
def test_broken_wiring_is_refused(repo, model, old, new, message):
    _edit(repo / model / "config.pbtxt", old, new)
    with pytest.raises(RepositoryError, match=message):
        validate_repository(repo)


def test_missing_required_input_is_refused(repo):
    text = (repo / "nli" / "config.pbtxt").read_text()
    start = text.index('    input_map {\n      key: "text_pair"')
    end = text.index("}", text.index("}", start) + 1) + 2
    (repo / "nli" / "config.pbtxt").write_text(text[:start] + text[end:])
    with pytest.raises(RepositoryError, match=r"does not feed the required inputs \['text_pair'\]"):
        validate_repository(repo)


def test_missing_model_file_is_refused(repo):
    (repo / "postprocess_sentiment" / "1" / "model.py").unlink()
    with pytest.raises(RepositoryError, match=r"model 'postprocess_sentiment'.*model.py is missing"):
        validate_repository(repo)


def test_missing_config_is_refused(repo):
    shutil.copytree(repo / "sentiment", repo / "stray")
    (repo / "stray" / "config.pbtxt").unlink()
    with pytest.raises(RepositoryError, match=r"model 'stray'.*config.pbtxt is missing"):
        validate_repository(repo)
