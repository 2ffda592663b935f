"""Generate `model_repository/` from one or more export directories.

Layout (docs/DESIGN.md section 6): `tokenizer/`, `backbone/`, `adapter_<task>/`, `postprocess_<task>/`
and the ensemble `<task>/`. Many tasks share one `backbone` when every run's backbone graph (and
its external data) has the same sha256 in its manifest, and one `tokenizer` when the tokenizer
files, max_length and text-pair flag agree; otherwise each task gets `backbone_<task>` /
`tokenizer_<task>` and the reason is logged. The repository is built in a staging directory,
validated (serving/validate.py), then swapped in; the README.md of the target is kept.

The generator deletes only what it wrote: `repository.json` lists every file and directory of the
last generation, and a target holding anything else (`--repository .` would be the project) is
refused before anything is written or deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from serving import contract
from serving import model_config as mcfg
from serving.artifacts import TOKENIZER_DIR, ExportedRun, load_run
from serving.config import ServeConfig
from serving.errors import RepositoryError
from serving.validate import CONFIG_FILE, validate_repository

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"
TRITON_MODELS = Path(__file__).resolve().parent / "triton_models"
KEEP = ("README.md",)
SUMMARY_FILE = "repository.json"
GENERATOR = "mp-ismoe serving.repository"  # repository.json's "generated_by": the ownership marker
_COMPONENTS = ("tokenizer", "backbone", "adapter", "postprocess")


@dataclass(frozen=True)
class TaskModels:
    """The four component models one task's ensemble chains."""

    run: ExportedRun
    tokenizer: str
    backbone: str
    adapter: str
    postprocess: str

    @property
    def task(self) -> str:
        return self.run.task


@dataclass
class RepositoryPlan:
    """Which models the repository holds, and why components are shared or not."""

    tasks: list[TaskModels]
    shared_backbone: bool
    shared_tokenizer: bool
    notes: list[str] = field(default_factory=list)

    def summary(self, cfg: ServeConfig) -> dict:
        return {
            "tasks": {
                t.task: {
                    "run": str(t.run.export_dir),
                    "tokenizer": t.tokenizer,
                    "backbone": t.backbone,
                    "adapter": t.adapter,
                    "postprocess": t.postprocess,
                    "text_pair": t.run.spec.text_pair,
                    "backbone_sha256": t.run.graph_sha256("backbone"),
                }
                for t in self.tasks
            },
            "shared_backbone": self.shared_backbone,
            "shared_tokenizer": self.shared_tokenizer,
            "notes": self.notes,
            "serve_config": cfg.to_dict(),
        }


def _tokenizer_key(run: ExportedRun) -> tuple:
    s = run.spec
    return (run.tokenizer_sha256(), s.max_length, s.text_pair, s.tokenizer_outputs)


def plan_repository(runs: list[ExportedRun]) -> RepositoryPlan:
    """Decide model names: shared backbone/tokenizer where the runs allow it."""
    if not runs:
        raise RepositoryError("no runs given: pass at least one exported run (runs/<name>)")
    tasks = [r.task for r in runs]
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise RepositoryError(f"task names {dupes} appear in more than one run; each run must export a distinct task")
    notes = []
    digests = {r.task: r.graph_sha256("backbone") for r in runs}
    shared_backbone = len(set(digests.values())) == 1
    if not shared_backbone:
        notes.append(
            f"one backbone per task: the backbone graphs differ (sha256 {', '.join(f'{t}={d[:12]}' for t, d in digests.items())}); "
            "tasks share a backbone only when they were trained from the same frozen (int8) backbone"
        )
    shared_tokenizer = len({_tokenizer_key(r) for r in runs}) == 1
    if not shared_tokenizer:
        notes.append("one tokenizer per task: the runs differ in tokenizer files, max_length or text-pair input")
    for note in notes:
        log.info(note)
    return RepositoryPlan(
        [
            TaskModels(
                r,
                contract.tokenizer_model(r.task, shared_tokenizer),
                contract.backbone_model(r.task, shared_backbone),
                contract.adapter_model(r.task),
                contract.postprocess_model(r.task),
            )
            for r in runs
        ],
        shared_backbone,
        shared_tokenizer,
        notes,
    )


def _copy(src: Path, dst: Path) -> None:
    """A real copy: a hard link would let an edit in the repository corrupt the export."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _write_config(model_dir: Path, config) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_FILE).write_text(mcfg.to_text(config))


def _python_model(model_dir: Path, kind: str) -> None:
    _copy(TRITON_MODELS / kind / mcfg.PYTHON_MODEL_FILE, model_dir / "1" / mcfg.PYTHON_MODEL_FILE)


def _write_tokenizer(root: Path, t: TaskModels, cfg: ServeConfig) -> None:
    d = root / t.tokenizer
    _write_config(d, mcfg.tokenizer_config(t.tokenizer, t.run.spec, cfg, TOKENIZER_DIR))
    _python_model(d, "tokenizer")
    shutil.copytree(t.run.export_dir / TOKENIZER_DIR, d / "1" / TOKENIZER_DIR)
    _write_warmup(d, mcfg.warmup_files(t.run.spec))


def _write_warmup(model_dir: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (model_dir / mcfg.WARMUP_DIR).mkdir(parents=True, exist_ok=True)
        (model_dir / mcfg.WARMUP_DIR / name).write_bytes(data)


def _check_profile(run: ExportedRun, cfg: ServeConfig) -> None:
    """Engines accept batches and lengths up to the export's optimization profile (io_spec.json's profile)."""
    profile, where = run.spec.profile, run.export_dir / "io_spec.json"
    if profile.get("batch") and cfg.max_batch_size > profile["batch"][2]:
        raise RepositoryError(
            f"max_batch_size {cfg.max_batch_size} exceeds the engines' profile max batch "
            f"{profile['batch'][2]} ({where}); lower --max-batch-size or re-export with a larger one"
        )
    if profile.get("sequence") and run.spec.max_length > profile["sequence"][2]:
        raise RepositoryError(
            f"{run.task}: max_length {run.spec.max_length} exceeds the engines' profile max sequence "
            f"{profile['sequence'][2]} ({where}); re-export with --max-seq >= {run.spec.max_length}"
        )


def _limits(runs: list[ExportedRun], graph: str) -> dict[str, int]:
    """Input bounds of a graph the runs share (one graph, so one vocabulary; the longest max_length)."""
    each = [r.input_limits(graph) for r in runs]
    return {k: (max if k == "max_length" else min)(e[k] for e in each) for k in each[0]}


def _runtime(runs: list[ExportedRun], cfg: ServeConfig) -> str:
    """The CPU runtime of a graph the runs share: theirs where they agree, else exact (gated for every export)."""
    chosen = {r.served_runtime(cfg.cpu_runtime) for r in runs}
    return chosen.pop() if len(chosen) == 1 else "exact"


def _write_graph(
    root: Path, name: str, graph: str, runs: list[ExportedRun], cfg: ServeConfig, notes: list[str]
) -> None:
    """backbone or adapter: an ONNX Runtime python model (cpu) or a TensorRT plan model (gpu)."""
    run = runs[0]
    d, io = root / name, getattr(run.spec, graph)
    instances = cfg.backbone_instances if graph == "backbone" else cfg.adapter_instances
    if cfg.warmup:
        _write_warmup(d, mcfg.graph_warmup_files(io, cfg))
    if cfg.target == "cpu":
        runtime = _runtime(runs, cfg)
        _write_config(
            d, mcfg.onnx_python_config(name, io, cfg, instances, run.graph(graph).name, _limits(runs, graph), runtime)
        )
        notes.append(f"{name}: ONNX Runtime {runtime} graph (serve.cpu_runtime={cfg.cpu_runtime})")
        _python_model(d, "onnx")
        for f in run.graph_files(graph):
            _copy(f, d / "1" / f.name)
        return
    _check_profile(run, cfg)
    engines = run.engines(graph)
    cc_files = {cc: p.name for cc, p in engines.items() if cc is not None}
    versions = sorted({p.name.split(".trt", 1)[1][: -len(".plan")] for p in engines.values() if ".trt" in p.name})
    if versions:
        notes.append(
            f"{name}: engines built with TensorRT {', '.join(versions)}: serve them in the NGC Triton "
            "container with that TensorRT version"
        )
    _write_config(d, mcfg.tensorrt_config(name, io, cfg, instances, cc_files))
    for cc, p in engines.items():
        _copy(p, d / "1" / (p.name if cc else mcfg.PLAN_FILE))
    if not engines:
        note = (
            f"{name}: no TensorRT engine for {graph} in {run.engines_dir}; build one with `make export` on a machine with "
            f"TensorRT (same version as the Triton container) and copy it to {name}/1/{mcfg.PLAN_FILE}"
        )
        notes.append(note)
        log.warning(note)
        (d / "NOTE.md").write_text(note + "\n")


def write_models(root: Path, plan: RepositoryPlan, cfg: ServeConfig) -> None:
    """Write every model of `plan` under `root` (an empty directory)."""
    written: set[str] = set()
    for t in plan.tasks:
        if t.tokenizer not in written:
            _write_tokenizer(root, t, cfg)
        if t.backbone not in written:
            sharing = [u.run for u in plan.tasks if u.backbone == t.backbone]
            _write_graph(root, t.backbone, "backbone", sharing, cfg, plan.notes)
        _write_graph(root, t.adapter, "adapter", [t.run], cfg, plan.notes)
        _write_config(root / t.postprocess, mcfg.postprocess_config(t.postprocess, t.run.spec, cfg))
        _python_model(root / t.postprocess, "postprocess")
        _write_config(
            root / t.task, mcfg.ensemble_config(t.run.spec, cfg, t.tokenizer, t.backbone, t.adapter, t.postprocess)
        )
        written |= {t.tokenizer, t.backbone}


def _entries(root: Path) -> tuple[list[str], list[str]]:
    """Every file and every directory under `root`, relative, sorted."""
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirs += [str(rel / d) for d in dirnames]
        files += [str(rel / f) for f in filenames]
    return sorted(files), sorted(dirs)


def _owned(root: Path):
    """A predicate telling what the last generation wrote under `root`, from its repository.json.

    Older repository.json files list no files: their model directories (and everything in them) count.
    """
    try:
        summary = json.loads((root / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("generated_by") == GENERATOR:
        owned = set(summary.get("files", [])) | set(summary.get("dirs", [])) | {SUMMARY_FILE}
        listed = owned.__contains__
    else:
        models = {SUMMARY_FILE, *summary.get("tasks", {})}
        models |= {t.get(k) for t in summary.get("tasks", {}).values() for k in _COMPONENTS}
        listed = lambda rel: rel.split(os.sep)[0] in models  # noqa: E731

    def owned_path(rel: str) -> bool:  # Python's bytecode cache next to a generated model.py counts too
        parts = rel.split(os.sep)
        cache = parts.index("__pycache__") if "__pycache__" in parts else None
        return listed(os.sep.join(parts[:cache]) if cache else rel)

    return owned_path


def foreign_entries(root: str | Path, limit: int = 5) -> list[str]:
    """Up to `limit` files or directories under `root` that this generator did not write (README.md aside)."""
    root = Path(root)
    if not root.is_dir():
        return []
    owned, found = _owned(root), []
    for dirpath, dirnames, filenames in os.walk(root):  # top-down: a foreign top-level entry is found first
        rel = Path(dirpath).relative_to(root)
        foreign_dirs = [d for d in sorted(dirnames) if not owned(str(rel / d))]
        found += [str(rel / d) + "/" for d in foreign_dirs]
        found += [str(rel / f) for f in sorted(filenames) if str(rel / f) not in KEEP and not owned(str(rel / f))]
        dirnames[:] = [d for d in dirnames if d not in foreign_dirs]  # no need to look inside
        if len(found) >= limit:
            break
    return found[:limit]


def check_replaceable(root: str | Path) -> None:
    """RepositoryError, deleting nothing, if `root` holds anything the generator did not write."""
    foreign = foreign_entries(root)
    if foreign:
        raise RepositoryError(
            f"refusing to generate into {root}: it holds {', '.join(foreign)}, which the repository "
            f"generator did not write (no {SUMMARY_FILE} of its own lists them); point --repository "
            "at an empty directory or one it generated. Nothing was deleted"
        )


def _swap_in(staging: Path, root: Path) -> None:
    """Replace what the last generation wrote in `root` by the staging directory's content."""
    root.mkdir(parents=True, exist_ok=True)
    check_replaceable(root)
    for p in root.iterdir():  # no foreign entry anywhere: everything but KEEP was generated
        if p.name not in KEEP:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in staging.iterdir():
        os.replace(p, root / p.name)


def generate_repository(
    runs: list[str | Path], root: str | Path = DEFAULT_REPOSITORY, cfg: ServeConfig | None = None
) -> RepositoryPlan:
    """Verify the runs, write and validate the repository at `root`; return the plan it followed."""
    cfg = cfg or ServeConfig()
    root = Path(root).resolve()
    check_replaceable(root)
    plan = plan_repository([load_run(r) for r in runs])
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    try:
        write_models(staging, plan, cfg)
        validate_repository(staging)
        files, dirs = _entries(staging)
        summary = {"generated_by": GENERATOR, **plan.summary(cfg), "files": files, "dirs": dirs}
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        _swap_in(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "model repository %s: tasks %s (%s backbone)",
        root,
        [t.task for t in plan.tasks],
        "shared" if plan.shared_backbone else "one per task",
    )
    return plan
