"""Repository generation: shared vs separate backbone, README kept, refusals, the gpu target."""

import json
import shutil

import pytest

from contracts.artifacts import ArtifactError, write_manifest
from serving.config import ServeConfig
from serving.errors import RepositoryError
from serving.repository import SUMMARY_FILE, generate_repository
from tests.serving.fake_export import build_fake_export


def _models(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_same_backbone_is_shared(fake_runs, tmp_path):
    plan = generate_repository([fake_runs["sentiment"], fake_runs["nli"]], tmp_path / "r")
    assert plan.shared_backbone and not any(n.startswith("one backbone") for n in plan.notes)
    assert _models(tmp_path / "r") == [
        "adapter_nli",
        "adapter_sentiment",
        "backbone",
        "nli",
        "postprocess_nli",
        "postprocess_sentiment",
        "sentiment",
        "tokenizer_nli",
        "tokenizer_sentiment",
    ]
    files = sorted(p.name for p in (tmp_path / "r" / "backbone" / "1").iterdir())
    assert files == ["backbone.onnx", "backbone.onnx.data", "model.py"]  # graph + its external data


def test_different_backbones_get_one_each(fake_runs, tmp_path, caplog):
    caplog.set_level("INFO")
    plan = generate_repository([fake_runs["sentiment"], fake_runs["topic"]], tmp_path / "r")
    assert not plan.shared_backbone and "backbone_sentiment" in _models(tmp_path / "r")
    assert "backbone_topic" in _models(tmp_path / "r") and "backbone" not in _models(tmp_path / "r")
    assert "backbone graphs differ" in caplog.text
    summary = json.loads((tmp_path / "r" / SUMMARY_FILE).read_text())
    assert summary["tasks"]["topic"]["backbone"] == "backbone_topic" and not summary["shared_backbone"]


def test_one_task_uses_the_plain_names(fake_runs, tmp_path):
    plan = generate_repository([fake_runs["sentiment"]], tmp_path / "r")
    assert plan.shared_backbone and plan.shared_tokenizer
    assert _models(tmp_path / "r") == [
        "adapter_sentiment",
        "backbone",
        "postprocess_sentiment",
        "sentiment",
        "tokenizer",
    ]


def test_readme_is_kept_and_stale_models_removed(fake_runs, tmp_path):
    root = tmp_path / "model_repository"
    root.mkdir()
    (root / "README.md").write_text("keep me")
    generate_repository([fake_runs["sentiment"], fake_runs["nli"]], root)
    generate_repository([fake_runs["sentiment"]], root)  # nli's models were generated: they go
    assert (root / "README.md").read_text() == "keep me"
    assert _models(root) == ["adapter_sentiment", "backbone", "postprocess_sentiment", "sentiment", "tokenizer"]


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("planted", ["notes.txt", "backbone/1/my_weights.bin", "my_model/"])
def test_a_directory_with_files_it_did_not_write_is_refused_and_nothing_deleted(fake_runs, tmp_path, planted):
    root = tmp_path / "r"
    generate_repository([fake_runs["sentiment"]], root)
    target = root / planted.rstrip("/")
    target.mkdir() if planted.endswith("/") else target.write_bytes(b"precious")
    before = _tree(root)
    with pytest.raises(
        RepositoryError, match=f"refusing to generate into {root}: it holds {planted}.*Nothing was deleted"
    ):
        generate_repository([fake_runs["nli"]], root)
    assert _tree(root) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_project_directory_is_refused_and_nothing_deleted(fake_runs, tmp_path):
    project = tmp_path / "project"
    (project / "runs" / "default" / "checkpoint").mkdir(parents=True)
    (project / "runs" / "default" / "checkpoint" / "side.safetensors").write_bytes(b"an hour of training")
    (project / "Makefile").write_text("all:\n")
    before = _tree(project)
    for target in (project, project / "runs"):
        with pytest.raises(RepositoryError, match="did not write"):
            generate_repository([fake_runs["sentiment"]], target)
    assert _tree(project) == before


def test_a_repository_from_an_older_generator_is_still_replaced(fake_runs, tmp_path):
    """repository.json files written before the file list existed name their models; those are replaced."""
    root = tmp_path / "r"
    generate_repository([fake_runs["sentiment"]], root)
    summary = json.loads((root / SUMMARY_FILE).read_text())
    old = {k: v for k, v in summary.items() if k not in ("generated_by", "files", "dirs")}
    (root / SUMMARY_FILE).write_text(json.dumps(old))
    generate_repository([fake_runs["nli"]], root)
    assert "adapter_nli" in _models(root) and "adapter_sentiment" not in _models(root)
    (root / "foreign.txt").write_text("x")
    with pytest.raises(RepositoryError, match="foreign.txt"):
        generate_repository([fake_runs["sentiment"]], root)


def test_python_bytecode_caches_in_model_directories_are_not_foreign(fake_runs, tmp_path):
    root = tmp_path / "r"
    generate_repository([fake_runs["sentiment"]], root)
    (root / "tokenizer" / "1" / "__pycache__").mkdir()
    (root / "tokenizer" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"pyc")
    generate_repository([fake_runs["sentiment"]], root)
    assert not (root / "tokenizer" / "1" / "__pycache__").exists()


def test_failed_generation_leaves_the_old_repository(fake_runs, tmp_path):
    root = tmp_path / "r"
    generate_repository([fake_runs["sentiment"]], root)
    before = _models(root)
    with pytest.raises(RepositoryError, match="more than one run"):
        generate_repository([fake_runs["sentiment"], fake_runs["sentiment"]], root)
    assert _models(root) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_corrupt_export_is_refused(fake_runs, tmp_path):
    run = shutil.copytree(fake_runs["sentiment"], tmp_path / "run")
    with open(run / "onnx" / "adapter.onnx", "ab") as f:
        f.write(b"0")
    with pytest.raises(ArtifactError, match="adapter.onnx is corrupt"):
        generate_repository([run], tmp_path / "r")


def test_io_spec_that_disagrees_with_the_graph_is_refused(fake_runs, tmp_path):
    run = shutil.copytree(fake_runs["sentiment"], tmp_path / "run")
    spec = run / "onnx" / "io_spec.json"
    spec.write_text(spec.read_text().replace('"cls_states"', '"cls_state"'))
    write_manifest(run / "onnx", "onnx")
    with pytest.raises(ArtifactError, match="cls_state"):
        generate_repository([run], tmp_path / "r")


def test_missing_export_says_how_to_fix(tmp_path):
    with pytest.raises(ArtifactError, match="make export"):
        generate_repository([tmp_path / "nothing"], tmp_path / "r")


def test_bad_task_name_is_refused(tmp_path):
    run = build_fake_export(tmp_path / "run", task="backbone_x")
    with pytest.raises(ArtifactError, match="collides"):
        generate_repository([run], tmp_path / "r")


def test_gpu_target_without_engines_writes_a_note(fake_runs, tmp_path):
    plan = generate_repository([fake_runs["sentiment"]], tmp_path / "r", ServeConfig(target="gpu"))
    config = (tmp_path / "r" / "backbone" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "KIND_GPU" in config
    assert (tmp_path / "r" / "backbone" / "NOTE.md").is_file() and any("no TensorRT engine" in n for n in plan.notes)
    assert 'backend: "python"' in (tmp_path / "r" / "tokenizer" / "config.pbtxt").read_text()


def test_gpu_target_uses_engines_per_compute_capability(fake_runs, tmp_path):
    run = shutil.copytree(fake_runs["sentiment"], tmp_path / "run")
    (run / "engines").mkdir()
    for name in (
        "backbone.sm80.trt10.8.plan",
        "backbone.sm90.trt10.7.plan",
        "backbone.sm90.trt10.8.plan",
        "backbone.sm100.trt11.0.plan",
        "adapter.plan",
        "unrelated.plan",
    ):
        (run / "engines" / name).write_bytes(b"plan")
    plan = generate_repository([run], tmp_path / "r", ServeConfig(target="gpu"))
    backbone = tmp_path / "r" / "backbone"
    assert sorted(p.name for p in (backbone / "1").iterdir()) == [
        "backbone.sm100.trt11.0.plan",
        "backbone.sm80.trt10.8.plan",
        "backbone.sm90.trt10.8.plan",
    ]
    config = (backbone / "config.pbtxt").read_text()
    assert 'key: "9.0"' in config and 'key: "10.0"' in config and "trt10.7" not in config
    assert (tmp_path / "r" / "adapter_sentiment" / "1" / "model.plan").is_file()
    assert any("TensorRT 10.8, 11.0" in n for n in plan.notes) and not any(
        "no TensorRT engine" in n for n in plan.notes
    )


def test_gpu_target_checks_the_engine_profile(fake_runs, tmp_path):
    run = shutil.copytree(fake_runs["sentiment"], tmp_path / "run")
    spec = json.loads((run / "onnx" / "io_spec.json").read_text())
    spec["profile"] = {"batch": [1, 8, 16], "sequence": [2, 64, 128]}
    (run / "onnx" / "io_spec.json").write_text(json.dumps(spec))
    write_manifest(run / "onnx", "onnx")
    with pytest.raises(RepositoryError, match="max_batch_size 32 exceeds the engines' profile max batch 16"):
        generate_repository([run], tmp_path / "r", ServeConfig(target="gpu"))
    generate_repository([run], tmp_path / "r", ServeConfig(target="gpu", max_batch_size=16))
    generate_repository([run], tmp_path / "r2", ServeConfig(target="cpu"))  # ONNX Runtime has no profile
