"""The export parity gate (export/parity.py): strict where exactness is owed, sound where routing is discontinuous.

Fast tests pin the pieces (route flips, forced routes, the judge); slow tests send real exports of
tiny trained models through the gate: good graphs pass, broken ones (backbone scales x4, an expert
zeroed, an expert dropped) fail, and five differently seeded models all pass.
"""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch

from contracts.parity_report import (
    AdapterParity,
    EndToEndParity,
    ExportReport,
    ParityResult,
    ReportError,
    RouteFlip,
    TensorError,
)
from export.onnx_export import export_adapter, export_backbone
from export.parity import GATES, _judge, check_parity, moe_blocks, route_flips
from export.pipeline import io_spec_for
from tests.conftest import tiny_overrides
from tests.onnx_fixtures import scale_dequantize_scales
from training.checkpoint import load_checkpoint, read_examples
from training.moe import FFNExperts, MoEBlock, forced_routes, routing_margin

# ---------------------------------------------------------------- pieces (fast)


def test_routing_margin_is_the_log_gap_at_the_k_th_choice():
    g = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [1.0, 1e-10, 1e-13, 0.0]]])  # (1, 3, 4)
    margin = routing_margin(g, 2)
    assert torch.allclose(margin, torch.tensor([[math.log(1.5), 0.0, math.log(1e3)]]), rtol=1e-4)
    assert torch.isinf(routing_margin(g, 4)).all()


def test_route_flips_counts_real_tokens_with_their_margin():
    ref = [torch.tensor([[[0, 1], [2, 3], [0, 1]]])]  # (B=1, T=3, k=2)
    other = [np.array([[[1, 0], [2, 1], [3, 2]]])]  # token 0: same set; 1: differs; 2: differs but padding
    gates = [torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.3, 0.3], [0.4, 0.3, 0.2, 0.1]]])]
    flips = route_flips(ref, other, gates, np.array([[1, 1, 0]]), row_offset=7)
    assert flips == [RouteFlip(row=7, block=0, token=1, pytorch_experts=[2, 3], onnx_experts=[1, 2], margin=0.0)]


def _moe(seed=0, experts=4):
    torch.manual_seed(seed)
    block = MoEBlock(FFNExperts(8, 16, experts), dim=8, backbone_dim=12, top_k=2)
    with torch.no_grad():
        block.router.weight.normal_()
    return block.eval()


def test_forced_routes_reproduce_the_own_choice_and_follow_another():
    block, x, cls, mask = _moe(), torch.randn(2, 5, 8), torch.randn(2, 12), torch.ones(2, 5)
    with torch.no_grad():
        y, aux = block(x, cls, mask)
        with forced_routes([block], [aux["indices"]]):
            same, _ = block(x, cls, mask)
        other = (aux["indices"] + 1) % 4
        with forced_routes([block], [other]):
            moved, aux_moved = block(x, cls, mask)
        again, _ = block(x, cls, mask)
    assert torch.equal(same, y) and torch.equal(again, y) and block.forced_indices is None
    assert torch.equal(aux_moved["indices"], other) and (moved - y).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 index tensors for 1 MoE blocks"):
        with forced_routes([block], [other, other]):
            pass


def _result(**changes) -> ParityResult:
    r = ParityResult(
        1,
        100,
        GATES["int8-weight"],
        {"hidden_states": TensorError(1e-3, 10.0, 1e-6)},
        AdapterParity(forced_route_max_abs=1e-6, native_max_abs=8e-3, route_flip_tokens=1, route_flip_rows=1),
        EndToEndParity(
            max_abs=8e-3,
            quantile_abs=5e-5,
            forced_route_max_abs=6e-5,
            label_agreement=1.0,
            metric_pytorch=0.8,
            metric_onnxruntime=0.8,
        ),
    )
    for k, v in changes.items():
        obj, attr = (r, k) if "." not in k else (getattr(r, k.split(".")[0]), k.split(".")[1])
        setattr(obj, attr, v)
    return r


def test_the_issue_case_passes_a_flip_at_a_tie_and_each_real_fault_fails():
    """The reported checkpoint: one route flip at a near-tie moved the logits by 8e-3, labels agreed."""
    assert _judge(_result()) == []
    cases = {
        "adapter.non_tie_flips": (1, "exported router is wrong"),
        "adapter.forced_route_max_abs": (2e-4, "adapter on identical inputs"),
        "end_to_end.forced_route_max_abs": (2e-3, "routes forced"),
        "end_to_end.quantile_abs": (2e-3, "0.99 quantile"),
        "end_to_end.label_agreement": (0.99, "label agreement"),
        "end_to_end.metric_onnxruntime": (0.79, "accuracy drop"),
    }
    for key, (value, words) in cases.items():
        failures = _judge(_result(**{key: value}))
        assert len(failures) == 1 and words in failures[0], (key, failures)
    big = {"hidden_states": TensorError(max_abs=5.0, max_reference=10.0, rms_rel=0.4)}
    assert "backbone hidden_states" in _judge(_result(backbone=big))[0]
    unobservable = _result(**{"adapter.routes_observable": False})
    assert "routes not observable" in _judge(unobservable)[0]  # then the native error is judged strictly


def test_lossy_precisions_are_judged_by_labels_and_accuracy_only():
    lossy = _result(
        gate=GATES["w8a8"],
        backbone={"hidden_states": TensorError(5.0, 10.0, 0.1)},
        **{"end_to_end.quantile_abs": 0.3, "end_to_end.forced_route_max_abs": 0.3},
    )
    assert _judge(lossy) == []
    assert GATES["w8a8"].adapter_max_abs == GATES["int8-weight"].adapter_max_abs  # the adapter stays fp32-exact


def test_accepting_a_limit_is_explicit_and_checked():
    gate = GATES["int8-weight"].with_overrides({"logits_quantile_max": 2e-3})
    assert gate.logits_quantile_max == 2e-3 and gate.adapter_max_abs == 1e-4
    with pytest.raises(ValueError, match="unknown parity limit"):
        GATES["int8-weight"].with_overrides({"logits": 1.0})


def test_report_round_trips_and_refuses_an_old_format(tmp_path):
    report = ExportReport("int8-weight", "toy", {"max_batch": 64}, parity={"accuracy_level_1": _result()})
    path = report.save(tmp_path / "parity.json")
    assert ExportReport.load(path) == report
    path.write_text(json.dumps({"precision": "int8-weight", "parity": {}}))  # a format-1 report
    with pytest.raises(ReportError, match="not a format-2 export report"):
        ExportReport.load(path)
    with pytest.raises(ReportError, match="missing"):
        ExportReport.load(tmp_path / "absent.json")


# ---------------------------------------------------------------- real exports of tiny trained models (slow)


def _export(model, meta, out, adapter_model=None):
    spec = io_spec_for(meta, "int8-weight")
    export_backbone(model, spec.backbone, out / "backbone.onnx")
    export_adapter(adapter_model or model, spec.adapter, out / "adapter.onnx")
    return out / "backbone.onnx", out / "adapter.onnx"


def _gate(model, tokenizer, meta, rows, backbone, adapter):
    return check_parity(
        model, tokenizer, rows, meta["labels"], meta["max_length"], backbone, adapter, "int8-weight", threads=1
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, toy_csv):
    """The shared tiny trained run with distinct experts and spread routing, exported once."""
    from tests.export.test_pipeline import force_every_expert_, heldout_batch
    from tests.training.test_trainer import trained_tiny_run

    run, _ = trained_tiny_run(tmp_path_factory, toy_csv)
    model, _, meta, tokenizer = load_checkpoint(run / "checkpoint")
    force_every_expert_(model, heldout_batch(run, tokenizer, meta))
    out = tmp_path_factory.mktemp("parity")
    backbone, adapter = _export(model, meta, out)
    return model, meta, tokenizer, read_examples(run / "checkpoint"), backbone, adapter


@pytest.mark.slow
def test_a_good_export_passes(tiny):
    model, meta, tokenizer, rows, backbone, adapter = tiny
    result = _gate(model, tokenizer, meta, rows, backbone, adapter)
    assert result.passed, result.failures
    assert result.adapter.routes_observable and result.adapter.forced_route_max_abs < 1e-5
    assert len(result.worst_rows) == 10 and result.worst_rows[0].logits_max_abs >= result.worst_rows[-1].logits_max_abs


@pytest.mark.slow
def test_backbone_scales_times_4_fail_the_gate(tiny, tmp_path):
    model, meta, tokenizer, rows, backbone, adapter = tiny
    for name in ("backbone.onnx", "backbone.onnx.data"):
        shutil.copy(backbone.parent / name, tmp_path / name)
    assert scale_dequantize_scales(tmp_path / "backbone.onnx", 4.0) == 12
    result = _gate(model, tokenizer, meta, rows, tmp_path / "backbone.onnx", adapter)
    assert not result.passed
    text = "\n".join(result.failures)
    assert "backbone hidden_states" in text and "routes forced" in text, text


@pytest.mark.slow
def test_an_expert_zeroed_in_the_graph_fails_the_gate(tiny, tmp_path):
    model, meta, tokenizer, rows, backbone, _ = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.adapter.blocks[0].ffn.experts.parameters():
            p[1].zero_()
    _, adapter = _export(broken, meta, tmp_path, adapter_model=broken)
    result = _gate(model, tokenizer, meta, rows, backbone, adapter)
    assert not result.passed
    assert any("adapter on identical inputs" in f for f in result.failures), result.failures


@pytest.mark.slow
def test_an_expert_dropped_from_the_graph_fails_the_gate(tiny, tmp_path):
    """The graph's first MoE keeps 3 of 4 experts (weights, router row and prior key removed)."""
    model, meta, tokenizer, rows, backbone, _ = tiny
    broken = copy.deepcopy(model)
    moe = broken.adapter.blocks[0].ffn
    keep = [0, 1, 3]
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2"):
            setattr(moe.experts, name, torch.nn.Parameter(getattr(moe.experts, name)[keep].clone()))
        moe.router.weight = torch.nn.Parameter(moe.router.weight[keep].clone())
        moe.prior_keys = torch.nn.Parameter(moe.prior_keys[keep].clone())
    _, adapter = _export(broken, meta, tmp_path, adapter_model=broken)
    result = _gate(model, tokenizer, meta, rows, backbone, adapter)
    assert not result.passed
    assert result.adapter.non_tie_flips > 0 and any("router is wrong" in f for f in result.failures)


@pytest.mark.slow
def test_five_differently_seeded_models_pass_the_gate(tmp_path, toy_csv):
    from training.config import load_config
    from training.trainer import Trainer

    budget = ["train.lr=1e-2", "train.epochs=3", "quant.requant_every_epochs=1", "train.threads=1"]
    flips = []
    for seed in range(1, 6):
        run = tmp_path / f"seed{seed}"
        cfg = load_config(
            overrides=tiny_overrides(toy_csv) + budget + [f"train.seed={seed}", f"data.split_seed={seed}"]
        )
        Trainer(cfg, run, progress=False).run()
        model, _, meta, tokenizer = load_checkpoint(run / "checkpoint")
        assert len(moe_blocks(model)) == 2
        backbone, adapter = _export(model, meta, run)
        result = _gate(model, tokenizer, meta, read_examples(run / "checkpoint"), backbone, adapter)
        assert result.passed, (seed, result.failures)
        flips.append(result.end_to_end.route_flip_tokens)
    assert len(flips) == 5


@pytest.mark.slow
def test_gate_parity_is_stable_under_a_tiny_backbone_change(tiny, tmp_path):
    """Backbone scales x (1 + 1e-4) is rounding-sized noise: flips may appear, the gate still passes."""
    model, meta, tokenizer, rows, backbone, adapter = tiny
    for name in ("backbone.onnx", "backbone.onnx.data"):
        shutil.copy(backbone.parent / name, tmp_path / name)
    scale_dequantize_scales(tmp_path / "backbone.onnx", 1.0 + 1e-4)
    result = _gate(model, tokenizer, meta, rows, tmp_path / "backbone.onnx", adapter)
    assert result.passed, result.failures
    assert result.backbone["hidden_states"].max_rel < 1e-3
