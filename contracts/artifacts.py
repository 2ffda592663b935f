"""Artifact directories that are complete or absent: sha256 manifests and atomic publishing.

Every stage writes into a temporary sibling directory, writes `manifest.json` last, then renames
the directory into place. A crash leaves only a `.tmp-*` directory that no stage accepts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
ARTIFACT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, corrupt or of another version."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, kind: str, extra: dict | None = None) -> dict:
    """Hash every file under `directory` (recursively) into manifest.json."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"kind": kind, "version": ARTIFACT_VERSION, "files": files, **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_manifest(directory: Path, kind: str) -> dict:
    """Check that `directory` is a complete `kind` artifact; raise ArtifactError saying what is wrong."""
    directory = Path(directory)
    fix = {"checkpoint": "re-run `make train`", "onnx": "re-run `make export`"}.get(kind, "regenerate it")
    if not directory.is_dir():
        raise ArtifactError(f"{directory} does not exist: {fix}")
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{mpath} is missing: {directory} is incomplete or was not written by this tool; {fix}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); {fix}") from e
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{mpath}: expected a {kind} artifact, found {manifest.get('kind')!r}")
    if manifest.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{mpath}: artifact version {manifest.get('version')} is not {ARTIFACT_VERSION}; {fix}")
    for name, info in manifest["files"].items():
        p = directory / name
        if not p.is_file():
            raise ArtifactError(f"{p} is listed in the manifest but missing; {fix}")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise ArtifactError(f"{p} is corrupt: its sha256 does not match {mpath}; {fix}")
    return manifest


@contextlib.contextmanager
def atomic_directory(target: Path, kind: str, extra: dict | None = None):
    """Yield a temporary directory; on success write its manifest and move it to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        write_manifest(tmp, kind, extra)
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
