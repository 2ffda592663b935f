"""checkov in a venv of its own: its pins (numpy>=2, packaging 23.2, networkx 2.6) clash with the project's.

The venv lives under .cache/deploy/checkov-<lock hash>/ and is built once from checkov-lock.txt (PyPI
only); checkov then runs offline (--skip-download: no guidelines or policies fetched from its vendor).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from serving.repository import PROJECT_ROOT

LOCK = Path(__file__).with_name("checkov-lock.txt")
CACHE = PROJECT_ROOT / ".cache" / "deploy"


def checkov_binary() -> Path:
    """The checkov executable of the locked venv, built first if missing (about 20 s; needs PyPI)."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    venv = CACHE / f"checkov-{digest}"
    binary = venv / "bin" / "checkov"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "checkov.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if (venv / ".complete").exists():
            return binary
        shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from an interrupted run
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        done = subprocess.run(
            [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", LOCK],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"could not install checkov from {LOCK}:\n{done.stderr[-3000:]}")
        (venv / ".complete").touch()
    return binary


def run_checkov(path: Path, framework: str) -> dict:
    """checkov's JSON report for a directory (kubernetes) or a file (dockerfile): passed, failed and skipped checks."""
    flag = "-d" if path.is_dir() else "-f"
    done = subprocess.run(
        [checkov_binary(), flag, path, "--framework", framework, "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode not in (0, 1):  # 1: some check failed (the caller asserts on the report)
        raise RuntimeError(f"checkov exited {done.returncode}:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    (found,) = [r for r in reports if r.get("check_type") == framework]
    return found
