"""Checkpoint I/O: exact round trip, sha256 manifest, clear errors, atomic writes."""

import json
import shutil

import pytest
import torch

from contracts.artifacts import ArtifactError, atomic_directory, verify_manifest, write_manifest
from tests.conftest import tiny_overrides
from training.backbone import load_tokenizer
from training.checkpoint import (
    BACKBONE_FILE,
    HELDOUT_FILE,
    SIDE_FILE,
    load_checkpoint,
    read_checkpoint_config,
    read_examples,
    save_checkpoint,
)
from training.config import load_config
from training.model import build_side_model

LABELS = ["neg", "pos"]
TEXTS = ["a wonderful film", "the plot was dull and the actors boring, really quite tedious", "superb"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, toy_csv):
    """A tiny side model with every adapter weight perturbed (so nothing sits at its init), saved once."""
    cfg = load_config(overrides=tiny_overrides(toy_csv))
    tokenizer = load_tokenizer(cfg.backbone)
    model, info = build_side_model(cfg, len(LABELS), tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    run = tmp_path_factory.mktemp("ckpt") / "run"
    heldout = "".join(
        json.dumps({"text": t, "text_pair": None, "label": LABELS[i % 2]}) + "\n" for i, t in enumerate(TEXTS)
    )
    path = save_checkpoint(
        run,
        model,
        cfg,
        info,
        tokenizer,
        LABELS,
        "toy",
        False,
        {"test_accuracy": 0.5},
        noise_state={"mu": torch.zeros(3)},
        extra_files={HELDOUT_FILE: heldout},
    )
    return model, tokenizer, path


def logits_of(model, tokenizer):
    batch = dict(tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt"))
    with torch.no_grad():
        return model(batch)[0]


@pytest.fixture
def copy_ckpt(saved, tmp_path):
    dst = tmp_path / "run" / "checkpoint"
    shutil.copytree(saved[2], dst)
    return dst


def test_checkpoint_layout(saved):
    path = saved[2]
    for name in (
        "config.json",
        "backbone_config.json",
        "tokenizer",
        BACKBONE_FILE,
        SIDE_FILE,
        "metrics.json",
        "manifest.json",
        HELDOUT_FILE,
    ):
        assert (path / name).exists(), name
    manifest = verify_manifest(path, "checkpoint")
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert not list(path.parent.glob(".tmp-*"))
    meta = read_checkpoint_config(path)
    assert (
        meta["labels"] == LABELS and meta["run"]["side"]["reduction"] == 2 and meta["backbone"]["tap_layers"] == [1, 2]
    )
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # safetensors and JSON only
    assert read_examples(path)[1]["label"] == "pos"


def test_round_trip_gives_identical_logits(saved):
    model, tokenizer, path = saved
    loaded, cfg, meta, tok = load_checkpoint(path)
    assert tok("superb")["input_ids"] == tokenizer("superb")["input_ids"]
    assert torch.equal(logits_of(loaded, tok), logits_of(model, tokenizer))
    for (k, a), (_, b) in zip(model.tap.encoder.state_dict().items(), loaded.tap.encoder.state_dict().items()):
        assert torch.equal(a, b), k
    assert not loaded.training and cfg.side.reduction == 2


@pytest.mark.parametrize(
    "extra", [["quant.bits=4"], ["train.method=lst"], ["quant.layernorm=frozen", "moe.prior=false"]]
)
def test_round_trip_of_other_configurations(toy_csv, tmp_path, extra):
    """4-bit packed codes, an fp backbone (LST, dense side), frozen LN without the prior: all reload exactly."""
    cfg = load_config(overrides=tiny_overrides(toy_csv) + extra + ["quant.keep_fp_reference=false"])
    tokenizer = load_tokenizer(cfg.backbone)
    model, info = build_side_model(cfg, len(LABELS), tokenizer)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    path = save_checkpoint(tmp_path, model, cfg, info, tokenizer, LABELS, "toy", False, {})
    loaded, cfg2, _, _ = load_checkpoint(path)
    assert cfg2 == cfg
    assert torch.equal(logits_of(loaded, tokenizer), logits_of(model, tokenizer))


def _other_encoder(kind: str, vocab: int):
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    if kind == "roberta":  # loaded for training without a pooler, like load_encoder does
        return RobertaModel(
            RobertaConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=66,
            ),
            add_pooling_layer=False,
        )
    return DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64))


@pytest.mark.parametrize("kind", ["distilbert", "roberta"])
def test_round_trip_of_a_non_bert_backbone(toy_csv, tmp_path, kind):
    cfg = load_config(overrides=tiny_overrides(toy_csv) + ["quant.keep_fp_reference=false"])
    tokenizer = load_tokenizer(cfg.backbone)
    model, info = build_side_model(cfg, len(LABELS), tokenizer, encoder=_other_encoder(kind, len(tokenizer)))
    model.eval()
    path = save_checkpoint(tmp_path, model, cfg, info, tokenizer, LABELS, "toy", False, {})
    loaded, _, meta, _ = load_checkpoint(path)
    assert meta["backbone"]["model_type"] == kind
    assert torch.equal(logits_of(loaded, tokenizer), logits_of(model, tokenizer))


def flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [BACKBONE_FILE, SIDE_FILE, "config.json", "tokenizer/tokenizer.json"])
def test_a_corrupted_byte_names_the_file(copy_ckpt, name):
    flip_byte(copy_ckpt / name)
    with pytest.raises(ArtifactError, match="corrupt") as e:
        load_checkpoint(copy_ckpt)
    assert name in str(e.value)


def test_a_truncated_safetensors_file_is_caught(copy_ckpt):
    p = copy_ckpt / SIDE_FILE
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=SIDE_FILE):
        load_checkpoint(copy_ckpt)


def test_garbage_safetensors_with_a_matching_manifest_is_an_artifact_error(copy_ckpt):
    """A manifest regenerated over a broken file must still not load (the reader's own check)."""
    (copy_ckpt / SIDE_FILE).write_bytes(b"\x00" * 64)
    write_manifest(copy_ckpt, "checkpoint", {"format": 1})
    with pytest.raises(ArtifactError, match=SIDE_FILE):
        load_checkpoint(copy_ckpt)


def test_missing_manifest(copy_ckpt):
    (copy_ckpt / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_checkpoint(copy_ckpt)


def test_manifest_that_is_not_json(copy_ckpt):
    (copy_ckpt / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_checkpoint(copy_ckpt)


@pytest.mark.parametrize("name", [SIDE_FILE, BACKBONE_FILE, "tokenizer/tokenizer_config.json"])
def test_missing_file(copy_ckpt, name):
    (copy_ckpt / name).unlink()
    with pytest.raises(ArtifactError, match="missing") as e:
        load_checkpoint(copy_ckpt)
    assert name in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_checkpoint(tmp_path / "nope" / "checkpoint")


def edit_manifest(ckpt, **changes):
    m = json.loads((ckpt / "manifest.json").read_text())
    m.update(changes)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def test_wrong_artifact_kind(copy_ckpt):
    edit_manifest(copy_ckpt, kind="onnx")
    with pytest.raises(ArtifactError, match="expected a checkpoint artifact, found 'onnx'"):
        load_checkpoint(copy_ckpt)


def test_wrong_artifact_version(copy_ckpt):
    edit_manifest(copy_ckpt, version=99)
    with pytest.raises(ArtifactError, match="version 99"):
        load_checkpoint(copy_ckpt)


def edit_config(ckpt, fn, name="config.json"):
    """Edit a JSON file and re-seal the manifest: a consistent checkpoint that disagrees with its weights."""
    meta = json.loads((ckpt / name).read_text())
    fn(meta)
    (ckpt / name).write_text(json.dumps(meta))
    write_manifest(ckpt, "checkpoint", {"format": 1})


def test_wrong_checkpoint_format(copy_ckpt):
    edit_config(copy_ckpt, lambda m: m.update(format=7))
    with pytest.raises(ArtifactError, match="format 7"):
        load_checkpoint(copy_ckpt)


def test_side_shape_mismatch_names_the_side_file(copy_ckpt):
    edit_config(copy_ckpt, lambda m: m["run"]["side"].update(reduction=4))
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(copy_ckpt)
    msg = str(e.value)
    assert SIDE_FILE in msg and "does not match" in msg and "\n" not in msg


def test_backbone_shape_mismatch_names_the_backbone_file(copy_ckpt):
    edit_config(copy_ckpt, lambda m: m.update(intermediate_size=2 * m["intermediate_size"]), "backbone_config.json")
    with pytest.raises(ArtifactError, match=BACKBONE_FILE):
        load_checkpoint(copy_ckpt)


def test_editing_config_without_resealing_is_caught_as_corruption(copy_ckpt):
    meta = json.loads((copy_ckpt / "config.json").read_text())
    meta["run"]["side"]["reduction"] = 4
    (copy_ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="config.json is corrupt"):
        load_checkpoint(copy_ckpt)


def test_an_interrupted_save_leaves_no_checkpoint(saved, tmp_path):
    model, tokenizer, path = saved
    meta = read_checkpoint_config(path)
    loaded, cfg, _, _ = load_checkpoint(path)
    from training.model import BackboneInfo

    info = BackboneInfo(**meta["backbone"])
    run = tmp_path / "run"
    with pytest.raises(TypeError):  # metrics that cannot be written, halfway through the save
        save_checkpoint(run, loaded, cfg, info, tokenizer, LABELS, "toy", False, {"bad": object()})
    assert not (run / "checkpoint").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    # over an existing checkpoint: the old one survives intact
    save_checkpoint(run, loaded, cfg, info, tokenizer, LABELS, "toy", False, {"ok": 1})
    with pytest.raises(TypeError):
        save_checkpoint(run, loaded, cfg, info, tokenizer, LABELS, "toy", False, {"bad": object()})
    verify_manifest(run / "checkpoint", "checkpoint")
    assert json.loads((run / "checkpoint" / "metrics.json").read_text()) == {"ok": 1}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]


def test_atomic_directory_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, "onnx") as tmp:
            (tmp / "a.txt").write_text("x")
            raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target, "onnx", {"precision": "fp32"}) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("y")
    m = verify_manifest(target, "onnx")
    assert m["precision"] == "fp32" and set(m["files"]) == {"sub/b.txt"}


def test_missing_heldout_rows(copy_ckpt):
    with pytest.raises(ArtifactError, match="calibration.jsonl is missing"):
        read_examples(copy_ckpt, "calibration.jsonl")
