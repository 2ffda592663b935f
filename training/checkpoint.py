"""Checkpoint I/O: safetensors + JSON only, a sha256 manifest, written atomically, verified on load.

Layout (docs/DESIGN.md section 2): config.json, backbone_config.json, tokenizer/, backbone_q.safetensors
(int8 codes, scales, zero points, norms), side.safetensors (adapter + noise parameters),
metrics.json, manifest.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from contracts.artifacts import ArtifactError, atomic_directory, verify_manifest

from .backbone import encoder_from_config
from .config import config_from_dict
from .model import BackboneInfo, SideTuned, build_side_model

CHECKPOINT_FORMAT = 2  # 2: streamed taps, logits-mode prior, noise upcycling (format-1 configs meant other defaults)
BACKBONE_FILE = "backbone_q.safetensors"
SIDE_FILE = "side.safetensors"
HELDOUT_FILE = "heldout.jsonl"  # the test split, so later stages check parity and accuracy without the dataset
CALIBRATION_FILE = "calibration.jsonl"  # training rows for activation calibration (w8a8)
CALIBRATION_ROWS = 512


def examples_jsonl(examples, labels: list[str]) -> str:
    """One JSON row per example; the label by name, or the score itself for regression."""
    rows = [
        {"text": e.text, "text_pair": e.text_pair, "label": e.label if isinstance(e.label, float) else labels[e.label]}
        for e in examples
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_examples(ckpt_dir: Path, name: str = HELDOUT_FILE) -> list[dict]:
    """Rows {text, text_pair, label} saved with the checkpoint."""
    path = Path(ckpt_dir) / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-run `make train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _contiguous(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(
    out_dir: Path,
    model: SideTuned,
    cfg,
    info: BackboneInfo,
    tokenizer,
    labels: list[str],
    task: str,
    text_pair: bool,
    metrics: dict,
    noise_state: dict | None = None,
    extra_files: dict[str, str] | None = None,
    task_type: str = "classification",
) -> Path:
    """Write `out_dir/checkpoint` atomically; returns its path."""
    target = Path(out_dir) / "checkpoint"
    with atomic_directory(target, "checkpoint", {"format": CHECKPOINT_FORMAT}) as tmp:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "task": task,
            "task_type": task_type,
            "labels": labels,
            "text_pair": text_pair,
            "backbone": info.to_dict(),
            "max_length": cfg.backbone.max_length,
            "run": cfg.to_dict(),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        model.tap.encoder.config.to_json_file(tmp / "backbone_config.json")
        tokenizer.save_pretrained(tmp / "tokenizer")
        state, tied = _untie(model.tap.encoder.state_dict())
        save_file(_contiguous(state), tmp / BACKBONE_FILE, metadata={"tied": json.dumps(tied)})
        side = {f"adapter.{k}": v for k, v in model.adapter.state_dict().items()}
        side.update({f"noise.{k}": v for k, v in (noise_state or {}).items()})
        save_file(_contiguous(side), tmp / SIDE_FILE)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return target


def read_checkpoint_config(ckpt_dir: Path) -> dict:
    """Verify the manifest and return config.json as a dict."""
    ckpt_dir = Path(ckpt_dir)
    verify_manifest(ckpt_dir, "checkpoint")
    meta = json.loads((ckpt_dir / "config.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(
            f"{ckpt_dir / 'config.json'}: checkpoint format {meta.get('format')} is not "
            f"{CHECKPOINT_FORMAT}; re-run `make train` with this version"
        )
    return meta


def _untie(state: dict) -> tuple[dict, dict[str, str]]:
    """Drop entries that share storage with an earlier one (tied embeddings: T5's shared/embed_tokens);
    returns (state, {dropped name: kept name}) so that loading can restore them."""
    kept, tied, out = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in kept:
            tied[name] = kept[key]
        else:
            kept[key], out[name] = name, t
    return out, tied


def _load_safetensors(path: Path) -> dict:
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise ArtifactError(f"{path} could not be read as safetensors ({e}); re-run `make train`") from e
    return state | {alias: state[name] for alias, name in tied.items() if name in state}


def _load_into(module: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(
            f"{path} does not match the model described by config.json: {e}".splitlines()[0]
            + " ... (was the checkpoint written by another configuration?)"
        ) from e


def load_checkpoint(ckpt_dir: Path):
    """Rebuild the trained model from a verified checkpoint: returns (model, cfg, meta, tokenizer)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_checkpoint_config(ckpt_dir)
    cfg = config_from_dict(meta["run"])
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / "tokenizer")
    hf_config = AutoConfig.from_pretrained(ckpt_dir / "backbone_config.json")
    torch.manual_seed(0)
    encoder = encoder_from_config(hf_config)
    model, _ = build_side_model(cfg, len(meta["labels"]), tokenizer, encoder=encoder, for_loading=True)
    _load_into(model.tap.encoder, _load_safetensors(ckpt_dir / BACKBONE_FILE), ckpt_dir / BACKBONE_FILE)
    side = _load_safetensors(ckpt_dir / SIDE_FILE)
    adapter_state = {k[len("adapter.") :]: v for k, v in side.items() if k.startswith("adapter.")}
    _load_into(model.adapter, adapter_state, ckpt_dir / SIDE_FILE)
    model.eval()
    return model, cfg, meta, tokenizer
