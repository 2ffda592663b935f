"""Where nvidia-pytriton put tritonserver, its python backend and stubs, and what the stub needs (numpy<2)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ServerError
from serving.repository import PROJECT_ROOT

CACHE_DIR = PROJECT_ROOT / ".cache" / "serving"
INSTALL_HINT = "install it with `pip install nvidia-pytriton` (it ships tritonserver 2.51; `make setup` does this)"


@dataclass(frozen=True)
class TritonInstall:
    """Where nvidia-pytriton put the server binary, its python backend, stubs and shared libraries."""

    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver inside the nvidia-pytriton package; ServerError saying how to install it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"tritonserver not found: the nvidia-pytriton package is not installed; {INSTALL_HINT}")
    base = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        base / "bin" / "tritonserver",
        base / "backends" / "python",
        base / "python_backend_stubs" / pyver / "triton_python_backend_stub",
        base.parent.parent / "nvidia_pytriton.libs",
    )
    for what, path in (
        ("binary", install.binary),
        ("python backend", install.python_backend / "libtriton_python.so"),
        (f"python {pyver} stub", install.stub),
        ("shared libraries", install.libs),
    ):
        if not path.exists():
            raise ServerError(f"tritonserver {what} not found at {path}; {INSTALL_HINT}")
    return install


def backend_directory(install: TritonInstall, cache: Path = CACHE_DIR) -> Path:
    """A --backend-directory holding python/ = the python backend + this Python's stub (symlinks)."""
    pyver = f"py{sys.version_info.major}{sys.version_info.minor}"
    python = cache / f"backends-{pyver}" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [*install.python_backend.iterdir(), install.stub]:
        if src.is_file():
            dst = python / src.name
            if dst.is_symlink() and dst.resolve() == src.resolve():
                continue
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            dst.symlink_to(src)
    return python.parent


def check_numpy() -> None:
    """Triton 2.51's stub corrupts TYPE_STRING inputs with numpy 2.x (docs/DESIGN.md section 6)."""
    version = importlib.metadata.version("numpy")
    if int(version.split(".")[0]) >= 2:
        raise ServerError(
            f"numpy {version} is installed in {sys.prefix}: the Triton 2.51 python-backend stub crashes on "
            "text (TYPE_STRING) inputs with numpy 2.x; install numpy<2 (pyproject.toml pins it)"
        )
