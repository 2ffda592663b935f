"""End to end on a real tritonserver: parity with in-process ONNX Runtime, bad input, load.

The in-process reference is independent of serving/: the Hugging Face tokenizer the export saved
and plain ONNX Runtime sessions on the export's graphs.
"""
import concurrent.futures as cf
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from transformers import AutoTokenizer
from tritonclient.utils import InferenceServerException

from export.io_spec import load_io_spec
from export.ort_session import make_session
from serving.client import Client, UnknownTaskError
from tests.conftest import FILLER, NEGATIVE, POSITIVE

pytestmark = pytest.mark.slow

TEXTS = [f"{a} {b} {c}" for a in FILLER[:3] for b in POSITIVE[:3] + NEGATIVE[:3] for c in ("", "and the plot", "!")]
LONG = "a very long review that goes on and on " * 40
PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


def reference(run, texts, pairs=None):
    """(labels, probabilities) from the HF tokenizer + ONNX Runtime, one example at a time."""
    export = run / "onnx"
    spec = load_io_spec(export)
    tok = AutoTokenizer.from_pretrained(str(export / "tokenizer"))
    backbone, adapter = make_session(export / "backbone.onnx"), make_session(export / "adapter.onnx")
    labels, probs = [], []
    for i, text in enumerate(texts):
        enc = tok([text], None if pairs is None else [pairs[i]], truncation=True, max_length=spec.max_length, return_tensors="np")
        feeds = {t.name: enc[t.name].astype(np.int64) for t in spec.backbone.inputs}
        hidden, cls = backbone.run(["hidden_states", "cls_states"], feeds)
        (logits,) = adapter.run(["logits"], {"hidden_states": hidden, "cls_states": cls, "attention_mask": feeds["attention_mask"]})
        p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        labels.append(spec.labels[int(p.argmax())])
        probs.append(p[0])
    return labels, np.array(probs)


def _url(server, protocol):
    return server.http_url if protocol == "http" else server.grpc_url


def _assert_same(preds, labels, probs, order):
    assert [p.label for p in preds] == labels
    got = np.array([[p.probabilities[k] for k in order] for p in preds])
    np.testing.assert_allclose(got, probs, atol=1e-4)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classify_matches_in_process_onnxruntime(served, fake_runs, protocol):
    labels, probs = reference(fake_runs["sentiment"], TEXTS + [LONG])
    with Client(_url(served, protocol), protocol) as client:
        preds = client.classify("sentiment", TEXTS + [LONG])  # LONG is truncated, not an error
    _assert_same(preds, labels, probs, ("neg", "pos"))
    assert len(set(labels)) > 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_text_pairs_match_in_process_onnxruntime(served, fake_runs, protocol):
    pairs = TEXTS[::-1]
    labels, probs = reference(fake_runs["nli"], TEXTS, pairs)
    with Client(_url(served, protocol), protocol) as client:
        info = client.task_info("nli")
        preds = client.classify("nli", TEXTS, pairs)  # 27 texts in chunks of max_batch_size=8
    assert info.max_batch_size == 8 and info.text_pair
    _assert_same(preds, labels, probs, info.labels)


def test_client_lists_tasks_and_refuses_unknown_ones(served):
    with Client(served.http_url) as client:
        assert client.tasks() == ["nli", "sentiment"]
        with pytest.raises(UnknownTaskError, match=r"unknown task 'sentimnt'.*\['nli', 'sentiment'\]"):
            client.classify("sentimnt", ["x"])
        with pytest.raises(UnknownTaskError):
            client.classify("backbone", ["x"])  # a component, not a task
        with pytest.raises(ValueError, match="classifies text pairs"):
            client.classify("nli", ["x"])


def _bytes(rows, name="text", module=httpclient, dtype="BYTES"):
    array = np.array(rows, dtype=object)
    t = module.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _typed(name, array, module=httpclient, dtype="INT64"):
    t = module.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


BAD_REQUESTS = {
    "wrong dtype": ("sentiment", lambda m: [_typed("text", np.zeros((1, 1), np.int64), m)], "datatype|data type|INT64"),
    "wrong rank": ("sentiment", lambda m: [_bytes([b"a", b"b"], module=m)], "shape"),
    "wrong shape": ("sentiment", lambda m: [_bytes([[b"a", b"b"]], module=m)], "shape"),
    "empty string": ("sentiment", lambda m: [_bytes([[b"fine"], [b""]], module=m)], r"text\[1\] is empty"),
    "non-utf8": ("sentiment", lambda m: [_bytes([[b"\xff\xfe\xfd"]], module=m)], "not valid UTF-8"),
    "batch too large": ("sentiment", lambda m: [_bytes([[b"x"]] * 9, module=m)], "batch.size|max_batch_size|batch size"),
    "unknown task": ("no_such_task", lambda m: [_bytes([[b"x"]], module=m)], "unknown model|not found"),
    "missing pair": ("nli", lambda m: [_bytes([[b"x"]], module=m)], "text_pair"),
    "backbone lengths disagree": ("backbone", lambda m: [
        _typed("input_ids", np.ones((1, 5), np.int64), m), _typed("attention_mask", np.ones((1, 6), np.int64), m),
        _typed("token_type_ids", np.zeros((1, 5), np.int64), m)], "sequence length"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_an_error_and_the_server_keeps_serving(served, fake_runs, case, protocol):
    model, build, message = BAD_REQUESTS[case]
    module = PROTOCOLS[protocol]
    client = module.InferenceServerClient(_url(served, protocol))
    with pytest.raises(InferenceServerException, match=f"(?i){message}"):
        client.infer(model, build(module))
    assert client.is_server_ready() and served.process.poll() is None
    with Client(_url(served, protocol), protocol) as ok:  # and the same task still answers correctly
        (pred,) = ok.classify("sentiment", [TEXTS[0]])
    assert pred.label == reference(fake_runs["sentiment"], [TEXTS[0]])[0][0]


def test_load_300_requests_at_concurrency_8(served, fake_runs):
    labels, probs = reference(fake_runs["sentiment"], TEXTS)
    local = threading.local()

    def one(i):
        if not hasattr(local, "client"):
            local.client = Client(served.grpc_url if i % 2 else served.http_url, "grpc" if i % 2 else "http")
        batch = [(i + j) % len(TEXTS) for j in range(1 + i % 3)]
        return batch, local.client.classify("sentiment", [TEXTS[k] for k in batch])

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(300)))  # any failure raises here
    assert len(results) == 300
    for batch, preds in results:
        _assert_same(preds, [labels[k] for k in batch], probs[batch], ("neg", "pos"))
    assert "not healthy" not in served.options.log_file.read_text()
    stats = httpclient.InferenceServerClient(served.http_url).get_inference_statistics("backbone")["model_stats"][0]
    assert stats["execution_count"] < stats["inference_stats"]["success"]["count"]  # requests were merged
