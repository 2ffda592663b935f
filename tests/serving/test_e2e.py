"""End to end on a real tritonserver: parity with in-process ONNX Runtime, bad input, load.

The in-process reference is independent of serving/: the Hugging Face tokenizer the export saved
and plain ONNX Runtime sessions on the export's graphs. Task names, labels and tensor names come
from each run's io_spec, so the same tests run on a real export (SERVING_TEST_RUN, conftest.py).
"""

import concurrent.futures as cf
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from transformers import AutoTokenizer
from tritonclient.utils import InferenceServerException

from export.ort_session import make_session
from serving.artifacts import load_run
from serving.client import Client, UnknownTaskError
from tests.conftest import FILLER, NEGATIVE, POSITIVE

pytestmark = pytest.mark.slow

TEXTS = [f"{a} {b} {c}" for a in FILLER[:3] for b in POSITIVE[:3] + NEGATIVE[:3] for c in ("", "and the plot", "!")]
LONG = "a very long review that goes on and on " * 40
PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


def reference(run, texts, pairs=None):
    """(labels, probabilities (N, C)) from the HF tokenizer + ONNX Runtime (the graph the server runs), one at a time."""
    export = load_run(run)
    spec = export.spec
    tok = AutoTokenizer.from_pretrained(str(export.export_dir / "tokenizer"))
    runtime = export.served_runtime()
    backbone = make_session(export.graph("backbone"), runtime=runtime)
    adapter = make_session(export.graph("adapter"), runtime=runtime)
    labels, probs = [], []
    for i, text in enumerate(texts):
        enc = tok(
            [text],
            None if pairs is None else [pairs[i]],
            truncation=True,
            max_length=spec.max_length,
            return_tensors="np",
        )
        feeds = {t.name: enc[t.name].astype(np.int64) for t in spec.backbone.inputs}
        states = dict(zip([t.name for t in spec.backbone.outputs], backbone.run(None, feeds)))
        (logits,) = adapter.run(None, {t.name: {**feeds, **states}[t.name] for t in spec.adapter.inputs})
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
def test_classify_matches_in_process_onnxruntime(served, serve_runs, specs, protocol):
    spec = specs["single"]
    labels, probs = reference(serve_runs["single"], TEXTS + [LONG])
    with Client(_url(served, protocol), protocol) as client:
        preds = client.classify(spec.task, TEXTS + [LONG])  # LONG is truncated, not an error
    _assert_same(preds, labels, probs, spec.labels)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_text_pairs_match_in_process_onnxruntime(served, serve_runs, specs, protocol):
    spec, pairs = specs["pair"], TEXTS[::-1]
    labels, probs = reference(serve_runs["pair"], TEXTS, pairs)
    with Client(_url(served, protocol), protocol) as client:
        info = client.task_info(spec.task)
        preds = client.classify(spec.task, TEXTS, pairs)  # 27 texts in chunks of max_batch_size=8
    assert info.max_batch_size == 8 and info.text_pair and info.labels == spec.labels
    _assert_same(preds, labels, probs, spec.labels)


def test_client_lists_tasks_and_refuses_unknown_ones(served, specs):
    tasks = sorted(s.task for s in specs.values())
    with Client(served.http_url) as client:
        assert client.tasks() == tasks
        with pytest.raises(UnknownTaskError, match=rf"unknown task 'no_such'.*{tasks}".replace("[", r"\[")):
            client.classify("no_such", ["x"])
        with pytest.raises(UnknownTaskError):
            client.classify(served.plan.tasks[0].backbone, ["x"])  # a component, not a task
        with pytest.raises(ValueError, match="classifies text pairs"):
            client.classify(specs["pair"].task, ["x"])


def _tensor(module, name, array, dtype):
    t = module.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _text(module, rows, name="text"):
    return _tensor(module, name, np.array(rows, dtype=object), "BYTES")


def _backbone_feeds(module, spec):
    """Backbone inputs whose sequence lengths disagree (6 for the mask, 5 for the others)."""
    return [
        _tensor(module, t.name, np.ones((1, 6 if t.name == "attention_mask" else 5), np.int64), "INT64")
        for t in spec.backbone.inputs
    ]


BAD_REQUESTS = {  # case -> (model to call, inputs, expected message); "single"/"pair" name a served task
    "wrong dtype": ("single", lambda m, s: [_tensor(m, "text", np.zeros((1, 1), np.int64), "INT64")], "data-?type"),
    "wrong rank": ("single", lambda m, s: [_text(m, [b"a", b"b"])], "shape"),
    "wrong shape": ("single", lambda m, s: [_text(m, [[b"a", b"b"]])], "shape"),
    "empty string": ("single", lambda m, s: [_text(m, [[b"fine"], [b""]])], r"text\[1\] is empty"),
    "non-utf8": ("single", lambda m, s: [_text(m, [[b"\xff\xfe\xfd"]])], "not valid UTF-8"),
    "batch too large": ("single", lambda m, s: [_text(m, [[b"x"]] * 9)], "batch-size must be <= 8"),
    "unknown task": ("no_such_task", lambda m, s: [_text(m, [[b"x"]])], "unknown model"),
    "missing pair": ("pair", lambda m, s: [_text(m, [[b"x"]])], "text_pair"),
    "backbone lengths disagree": ("backbone", lambda m, s: _backbone_feeds(m, s), "sequence length"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_an_error_and_the_server_keeps_serving(served, serve_runs, specs, case, protocol):
    target, build, message = BAD_REQUESTS[case]
    spec = specs["single"]
    model = {"single": spec.task, "pair": specs["pair"].task, "backbone": served.plan.tasks[0].backbone}.get(
        target, target
    )
    module = PROTOCOLS[protocol]
    client = module.InferenceServerClient(_url(served, protocol))
    with pytest.raises(InferenceServerException, match=f"(?i){message}"):
        client.infer(model, build(module, spec))
    assert client.is_server_ready() and served.process.poll() is None
    with Client(_url(served, protocol), protocol) as ok:  # and the task still answers correctly
        (pred,) = ok.classify(spec.task, [TEXTS[0]])
    assert pred.label == reference(serve_runs["single"], [TEXTS[0]])[0][0]


def test_load_300_requests_at_concurrency_8(served, serve_runs, specs):
    spec = specs["single"]
    labels, probs = reference(serve_runs["single"], TEXTS)
    local = threading.local()

    def one(i):
        if not hasattr(local, "client"):
            local.client = Client(served.grpc_url if i % 2 else served.http_url, "grpc" if i % 2 else "http")
        batch = [(i + j) % len(TEXTS) for j in range(1 + i % 3)]
        return batch, local.client.classify(spec.task, [TEXTS[k] for k in batch])

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(300)))  # any failure raises here
    assert len(results) == 300
    for batch, preds in results:
        _assert_same(preds, [labels[k] for k in batch], probs[batch], spec.labels)
    assert "not healthy" not in served.options.log_file.read_text()
    backbone = served.plan.tasks[0].backbone
    stats = httpclient.InferenceServerClient(served.http_url).get_inference_statistics(backbone)["model_stats"][0]
    assert stats["execution_count"] < stats["inference_stats"]["success"]["count"]  # requests were merged
