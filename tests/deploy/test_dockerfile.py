"""deploy/Dockerfile, checked without a Docker engine: BuildKit's parser, its instructions, and that it
copies and installs exactly what the python-backend models and the sidecar import."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dockerfile
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMPORT_NAMES = {"numpy": "numpy", "tokenizers": "tokenizers", "onnxruntime": "onnxruntime", "onnx": "onnx"}
# modules onnx itself imports (protobuf, ml_dtypes, typing_extensions): installed with it, not listed
DEPENDENCIES_OF_LISTED = {"google", "ml_dtypes", "typing_extensions"}

# Loads every python-backend model.py as Triton's stub would (with a stand-in triton_python_backend_utils,
# which exists only inside the stub) and the sidecar; prints the top-level modules that are not stdlib.
_PROBE = """
import importlib.util, json, sys, types
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("model_" + str(hash(path)), path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
import deploy.sidecar
names = {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)
print(json.dumps(sorted(n for n in names if not n.startswith("_") and not n.startswith("model_"))))
"""


def instructions() -> list:
    return list(dockerfile.parse_file(str(DEPLOY / "Dockerfile")))


def requirements() -> dict[str, Requirement]:
    lines = (DEPLOY / "requirements.txt").read_text().splitlines()
    return {r.name: r for r in (Requirement(line) for line in lines if line.strip() and not line.startswith("#"))}


def imported_modules() -> set[str]:
    """Third-party and project top-level modules the models and the sidecar import, from a fresh interpreter."""
    models = sorted(str(p) for p in (ROOT / "serving" / "triton_models").glob("*/model.py"))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *models],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout)) - {"cython_runtime", "triton_python_backend_utils"}


def test_base_image_and_user():
    cmds = instructions()
    arg, frm = cmds[0], cmds[1]
    assert (arg.cmd, frm.cmd) == ("ARG", "FROM")
    assert frm.value == ("nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3",)
    assert re.fullmatch(r"TRITON_RELEASE=\d\d\.\d\d", arg.value[0])
    users = [c for c in cmds if c.cmd == "USER"]
    assert users and users[-1].value == ("1000:1000",)  # the NGC image's triton-server user, not root
    assert cmds.index(users[-1]) > max(i for i, c in enumerate(cmds) if c.cmd == "RUN")
    assert not [c for c in cmds if c.cmd == "ADD"]
    assert [c.value for c in cmds if c.cmd == "EXPOSE"] == [("8000", "8001", "8002")]
    assert [c.cmd for c in cmds][-2:] == ["HEALTHCHECK", "CMD"]


def test_copies_what_the_models_import():
    """The image holds every project package the python models and the sidecar import, on its PYTHONPATH."""
    cmds = instructions()
    env = dict(zip(*[iter(next(c for c in cmds if c.cmd == "ENV").value)] * 2))
    workdir = next(c for c in cmds if c.cmd == "WORKDIR").value[0]
    assert env["PYTHONPATH"] == workdir == "/opt/mp-ismoe"
    copied = {c.value[0].rstrip("/") for c in cmds if c.cmd == "COPY"}
    project = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    used = imported_modules()
    assert used & project == {"contracts", "serving", "export", "deploy"}
    assert used & project <= copied
    # nothing else: no torch, no transformers in the image (onnx: export/cpu_graph.py rewrites graphs at load)
    assert used - project - DEPENDENCIES_OF_LISTED == set(IMPORT_NAMES.values())


def test_requirements_match_pyproject():
    """deploy/requirements.txt states pyproject's specifiers (numpy<2 among them) and is what the image installs."""
    project = {Requirement(d).name: Requirement(d) for d in _pyproject_dependencies()}
    reqs = requirements()
    assert set(reqs) == set(IMPORT_NAMES)
    for name, req in reqs.items():
        assert req.specifier == project[name].specifier, name
    assert not reqs["numpy"].specifier.contains("2.0.0") and reqs["numpy"].specifier.contains("1.26.4")
    runs = " ".join(c.value[0] for c in instructions() if c.cmd == "RUN")
    assert "pip install --requirement deploy/requirements.txt" in runs
    assert "numpy.__version__" in runs  # the build fails if numpy 2 slipped in


def test_dockerignore_keeps_what_is_copied():
    lines = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {c.value[0].split("/")[0] for c in instructions() if c.cmd == "COPY"}
    assert copied <= kept == {"contracts", "serving", "export", "deploy"}
    assert "deploy/rendered/" in lines


def _pyproject_dependencies() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
