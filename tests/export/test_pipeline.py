"""`make export` end to end on the tiny trained model: one run_export per session, then its report,
artifacts and failure modes; every expert reached through ONNX Runtime; fp16 and w8a8 backbones.

The exported checkpoint is the tiny trained one with its routers forced to spread tokens over
all experts and its experts made clearly different, so the parity gate itself proves that the
exported top-k MoE computes every expert (a graph that dropped one would miss the tolerance).
Sessions and the export run on one thread: on shared cores, two threads wait on each other.
"""

import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from contracts.artifacts import ArtifactError, verify_manifest
from contracts.parity_report import ExportReport
from export.cpu_graph import cpu_graph
from export.io_spec import load_io_spec
from export.onnx_export import export_backbone
from export.ort_session import make_session
from export.parity import GATES, check_parity, to_examples
from export.pipeline import PARITY_FILE, ExportConfig, io_spec_for, run_export, write_backbone
from export.trt_check import check_tensorrt_compatible
from tests.training.test_trainer import trained_tiny_run
from training.checkpoint import (
    BACKBONE_FILE,
    CALIBRATION_FILE,
    HELDOUT_FILE,
    load_checkpoint,
    read_examples,
    save_checkpoint,
)
from training.data import make_loader
from training.model import BackboneInfo

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def heldout_batch(run: Path, tokenizer, meta) -> dict:
    rows = read_examples(run / "checkpoint")
    loader = make_loader(to_examples(rows, meta["labels"]), tokenizer, meta["max_length"], len(rows), shuffle=False)
    return next(iter(loader))


def force_every_expert_(model, batch: dict, tries: int = 50) -> int:
    """Strong random routers under which every expert is some real token's first choice in every block
    of `batch`, and distinct experts. Routers are drawn seed by seed until that holds; returns the seed."""
    experts = {id(b.ffn): [p.detach().clone() for p in b.ffn.experts.parameters()] for b in model.adapter.blocks}
    real = batch["attention_mask"].bool()
    for seed in range(tries):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for block in model.adapter.blocks:
                moe = block.ffn
                moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g) * 5.0)
                if moe.log_temperature is not None:  # a mild prior: the token features decide
                    moe.log_temperature.fill_(1.0)
                for p, p0 in zip(moe.experts.parameters(), experts[id(moe)]):
                    p.copy_(p0 + torch.randn(p.shape, generator=g) * (0.5 * float(p0.std()) + 1e-2))
        *_, indices = adapter_io(model, batch)
        n = model.adapter.blocks[0].ffn.num_experts
        if all(set(idx[real][:, 0].tolist()) == set(range(n)) for idx in indices):
            return seed
    raise AssertionError(f"no router draw in {tries} reaches every expert")


def adapter_io(model, batch):
    """Backbone states for a batch, and the adapter's logits and per-block expert indices on them."""
    with torch.no_grad():
        hs, cls = model.tap(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        logits, aux = model.adapter(hs, cls, batch["attention_mask"])
    return hs, cls, logits, [a["indices"] for a in aux]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, toy_csv):
    """(run_dir, report, model, meta, tokenizer) of one export of the routing-forced tiny checkpoint."""
    src, metrics = trained_tiny_run(tmp_path_factory, toy_csv)
    model, cfg, meta, tokenizer = load_checkpoint(src / "checkpoint")
    force_every_expert_(model, heldout_batch(src, tokenizer, meta))
    run = tmp_path_factory.mktemp("export") / "run"
    extra = {n: (src / "checkpoint" / n).read_text() for n in (HELDOUT_FILE, CALIBRATION_FILE)}
    save_checkpoint(
        run,
        model,
        cfg,
        BackboneInfo(**meta["backbone"]),
        tokenizer,
        meta["labels"],
        meta["task"],
        meta["text_pair"],
        metrics,
        extra_files=extra,
    )
    report = run_export(run, ExportConfig(threads=1, compare_fp32_size=False), log=lambda *a: None)
    return run, report, model, meta, tokenizer


def test_heldout_rows_route_to_every_expert(exported):
    run, _, model, meta, tokenizer = exported
    batch = heldout_batch(run, tokenizer, meta)
    _, _, _, indices = adapter_io(model, batch)
    real = batch["attention_mask"].bool()
    n = model.adapter.blocks[0].ffn.num_experts
    assert len(indices) == len(model.adapter.blocks) >= 2
    for idx in indices:  # (B, T, k)
        assert set(idx[real].flatten().tolist()) == set(range(n))
        assert set(idx[real][:, 0].tolist()) == set(range(n))  # every expert is someone's first choice


def test_every_expert_matters_beyond_the_parity_tolerance(exported):
    """Sensitivity of the check below: swapping any one expert for another moves the logits."""
    run, _, model, meta, tokenizer = exported
    batch = heldout_batch(run, tokenizer, meta)
    hs, cls, ref, _ = adapter_io(model, batch)
    tol = GATES["int8-weight"].forced_route_max_abs
    for block in model.adapter.blocks:
        experts = block.ffn.experts
        for j in range(experts.num_experts):
            saved = [p[j].clone() for p in experts.parameters()]
            with torch.no_grad():
                for p in experts.parameters():
                    p[j] = p[(j + 1) % experts.num_experts]
                moved = model.adapter(hs, cls, batch["attention_mask"])[0]
                for p, s in zip(experts.parameters(), saved):
                    p[j] = s
            assert (moved - ref).abs().max() > 10 * tol


def test_exported_adapter_computes_every_expert(exported):
    run, _, model, meta, tokenizer = exported
    batch = heldout_batch(run, tokenizer, meta)
    hs, cls, ref, _ = adapter_io(model, batch)
    sess = make_session(run / "onnx" / "adapter.onnx", threads=1)
    (logits,) = sess.run(
        None,
        {"hidden_states": hs.numpy(), "cls_states": cls.numpy(), "attention_mask": batch["attention_mask"].numpy()},
    )
    np.testing.assert_allclose(logits, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_adapter_graph_is_a_static_top_k_moe(exported):
    g = onnx.load(str(exported[0] / "onnx" / "adapter.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in g.node}
    assert "TopK" in ops
    assert not ops & {"NonZero", "Loop", "If", "Scan"}, ops


def test_parity_json_judges_the_exported_and_the_served_graphs(exported):
    run, report, *_ = exported
    on_disk = ExportReport.load(run / "onnx" / PARITY_FILE)
    assert on_disk == report  # the typed report round-trips through parity.json
    assert on_disk.passed is True and on_disk.failures == [] and on_disk.precision == "int8-weight"
    exact, folded, int8 = on_disk.gated(1), on_disk.parity["cpu_exact"], on_disk.parity["cpu_int8"]
    assert (exact.runtime, folded.runtime, int8.runtime) == ("qdq", "exact", "int8")
    assert folded.passed and folded.end_to_end.label_agreement == 1.0
    assert folded.backbone["hidden_states"].max_rel < 1e-5  # folding the weights once is exact
    assert int8.gate.min_label_agreement < 1.0 and int8.gate.backbone_max_rel is None  # judged by accuracy
    assert on_disk.served_runtime == ("int8" if int8.passed else "exact")
    for p in (exact, folded, int8):
        assert p.rows == 24 and set(p.backbone) == {"hidden_states", "cls_states"}
        assert p.end_to_end.label_agreement >= 0.95 and p.adapter.routes_observable
    assert exact.passed and exact.end_to_end.label_agreement == 1.0
    assert exact.adapter.forced_route_max_abs < 1e-5 and exact.backbone["hidden_states"].max_rel < 1e-5
    assert (
        exact.end_to_end.metric == "accuracy" and exact.end_to_end.metric_pytorch == exact.end_to_end.metric_onnxruntime
    )
    assert exact.gate == GATES["int8-weight"] and exact.gate.logits_quantile_max <= 1e-3
    assert exact.adapter.non_tie_flips == 0 and len(exact.worst_rows) == 10
    assert (
        int8.backbone["hidden_states"].max_rel >= exact.backbone["hidden_states"].max_rel
    )  # int8 activations are lossier


def test_export_report_gates(exported):
    report = exported[1]
    assert report.tensorrt_check == {"backbone": [], "adapter": []}
    assert all(r["passed"] for r in report.lint.values())
    assert all(r.get("passed") for r in report.polygraphy_run.values())
    assert all(r["rows"] > 0 for r in report.polygraphy_run.values())
    assert report.tensorrt["available"] is False and "tensorrt" in report.tensorrt["note"]
    assert report.sizes["backbone_bytes"] > 0 and report.sizes["adapter_bytes"] > 0


def test_onnx_directory_is_a_complete_artifact(exported):
    run, _, _, meta, _ = exported
    onnx_dir = run / "onnx"
    manifest = verify_manifest(onnx_dir, "onnx")
    for name in (
        "backbone.onnx",
        "adapter.onnx",
        "io_spec.json",
        PARITY_FILE,
        HELDOUT_FILE,
        "tokenizer/tokenizer.json",
    ):
        assert name in manifest["files"], name
    assert manifest["precision"] == "int8-weight"
    assert not (run / "onnx-failed-parity.json").exists() and not list(run.glob(".tmp-*"))
    spec = load_io_spec(onnx_dir)
    assert spec == io_spec_for(meta, "int8-weight", exported[2].tap.encoder, ExportConfig(threads=1))
    assert spec.vocab_size == 30522 and spec.max_positions == 512 and spec.profile["sequence"] == [2, 64, 128]
    assert spec.backbone.input("input_ids").axes == ("batch", "sequence")
    sess = make_session(onnx_dir / "backbone.onnx")
    assert [i.name for i in sess.get_inputs()] == list(spec.tokenizer_outputs)
    assert [o.name for o in sess.get_outputs()] == ["hidden_states", "cls_states"]


def test_corrupt_checkpoint_fails_the_export_and_leaves_no_onnx(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported[0] / "checkpoint", run / "checkpoint")
    p = run / "checkpoint" / BACKBONE_FILE
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=BACKBONE_FILE):
        run_export(run, ExportConfig(threads=1), log=lambda *a: None)
    assert sorted(x.name for x in run.iterdir()) == ["checkpoint"]


def test_cli_reports_a_corrupt_checkpoint_with_exit_code_2(exported, tmp_path, capsys):
    from export.cli import main

    run = tmp_path / "run"
    shutil.copytree(exported[0] / "checkpoint", run / "checkpoint")
    (run / "checkpoint" / "side.safetensors").write_bytes(b"garbage")
    assert main(["--run", str(run)]) == 2
    assert "side.safetensors" in capsys.readouterr().err
    assert not (run / "onnx").exists()


def test_python_m_export_help():
    out = subprocess.run(
        [sys.executable, "-m", "export", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    for word in ("--run", "--precision", "int8-weight", "w8a8", "fp16", "int4-weight", "parity.json"):
        assert word in out.stdout


@pytest.fixture(scope="module")
def other_precision(exported, tmp_path_factory):
    """Build a backbone in another precision next to the int8 run's adapter; return a parity report."""
    run, _, model, meta, tokenizer = exported
    rows = read_examples(run / "checkpoint")

    def build(precision: str):
        out = tmp_path_factory.mktemp(precision)
        for name in ("adapter.onnx", "adapter.onnx.data"):  # the adapter graph does not depend on precision
            if (run / "onnx" / name).exists():
                shutil.copy(run / "onnx" / name, out / name)
        spec = io_spec_for(meta, precision)
        if precision == "w8a8":
            write_backbone(model, spec, out, ExportConfig(precision="w8a8"), run / "checkpoint", tokenizer, meta)
        else:
            export_backbone(model, spec.backbone, out / "backbone.onnx", precision)
        report = check_parity(
            model,
            tokenizer,
            rows,
            meta["labels"],
            meta["max_length"],
            out / "backbone.onnx",
            out / "adapter.onnx",
            precision,
            accuracy_level=1,
            threads=1,
        )
        return out, report

    return build


def test_fp16_export_runs_in_onnxruntime_cpu(other_precision):
    out, report = other_precision("fp16")
    m = onnx.load(str(out / "backbone.onnx"), load_external_data=False)
    matrices = [
        i.data_type
        for i in m.graph.initializer
        if len(i.dims) == 2 and i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    ]
    assert matrices and set(matrices) == {onnx.TensorProto.FLOAT16}  # fp16 weights; outputs are cast to fp32
    assert report.rows == 24 and report.passed, report.failures
    assert report.end_to_end.quantile_abs < GATES["fp16"].logits_quantile_max


def test_w8a8_export_quantizes_activations_and_runs(other_precision):
    out, report = other_precision("w8a8")
    m = onnx.load(str(out / "backbone.onnx"), load_external_data=False)
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert q, "no activation quantization"
    errors = [f for f in check_tensorrt_compatible(out / "backbone.onnx") if f.level == "error"]
    assert errors == []  # symmetric int8 with explicit axes
    assert report.rows == 24 and report.passed, report.failures
    assert report.end_to_end.label_agreement >= GATES["w8a8"].min_label_agreement


def test_w8a8_quantizes_gemm_inputs_only_and_every_gemm_runs_as_int8_in_onnxruntime(other_precision, tmp_path):
    """Q/DQ sit on MatMul inputs only (never on outputs or the residual stream), and ONNX Runtime's
    CPU optimizer turns every weight MatMul into MatMulIntegerToFloat (none left in fp32)."""
    out, _ = other_precision("w8a8")
    m = onnx.load(str(out / "backbone.onnx"), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in producer:
            assert producer[n.input[0]].op_type != "MatMul", f"{n.name} quantizes a MatMul output"
            for dq_out in (
                d.output[0] for d in m.graph.node if d.op_type == "DequantizeLinear" and d.input[0] == n.output[0]
            ):
                assert set(readers[dq_out]) == {"MatMul"}, f"{n.name}: non-GEMM readers {readers[dq_out]}"
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "backbone.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    inits = {i.name for i in m.graph.initializer}
    weight_gemms = [
        n
        for n in m.graph.node
        if n.op_type == "MatMul"
        and producer[n.input[1]].op_type == "DequantizeLinear"
        and producer[n.input[1]].input[0] in inits
    ]
    assert weight_gemms and ops.count("MatMulIntegerToFloat") + ops.count("QLinearMatMul") >= len(weight_gemms)
    assert "MatMul" not in ops, "a quantized GEMM was left in fp32"


def test_w8a8_cpu_graphs_fold_the_gemms_and_int8_runs_attention_in_float(other_precision, exported):
    """Both CPU rewrites of a w8a8 graph build its int8 GEMMs directly (bias folded, q/k/v unsplit);
    `int8` also drops the attention's Q/DQ (no int8 attention kernel on CPU) so the attention fuses;
    parity judges it by accuracy."""
    out, _ = other_precision("w8a8")
    run, _, model, meta, tokenizer = exported
    exported_graph = onnx.load(str(out / "backbone.onnx"))
    layers = sum(n.op_type == "Softmax" for n in exported_graph.graph.node)
    graph, changes = cpu_graph(exported_graph, "int8")
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert changes["float_attention_matmuls"] == 2 * layers and ops["MultiHeadAttention"] == layers > 0
    assert "Softmax" not in ops and ops["QuantizeLinear"] > 0  # the linears stay int8
    weight_gemms = changes["qdq_gemms"]  # each Q/DQ GEMM -> MatMulIntegerToFloat, bias and q/k/v split folded in
    assert weight_gemms > 0 and "Split" not in ops and ops["MatMulIntegerToFloat"] > weight_gemms
    session = make_session(out / "backbone.onnx", threads=1)
    feeds = {i.name: np.ones((2, 9), np.int64) for i in session.get_inputs()}
    feeds["input_ids"] = np.arange(100, 118).reshape(2, 9)
    as_exported = session.run(None, feeds)
    for a, b in zip(make_session(out / "backbone.onnx", threads=1, runtime="exact").run(None, feeds), as_exported):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())  # the same integer arithmetic
    report = check_parity(
        model,
        tokenizer,
        read_examples(run / "checkpoint"),
        meta["labels"],
        meta["max_length"],
        out / "backbone.onnx",
        out / "adapter.onnx",
        "w8a8",
        threads=1,
        runtime="int8",
    )
    assert report.passed, report.failures
