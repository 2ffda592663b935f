"""The export artifact as the serving stage reads it: verified, its graphs checked against io_spec.

`runs/<name>/onnx/` holds backbone.onnx and adapter.onnx (each possibly with external data),
io_spec.json, tokenizer/ and manifest.json; `runs/<name>/engines/` holds TensorRT plans where they
were built, named `<graph>.sm<major><minor>.trt<A>.<B>.plan` (export/tensorrt_build.engine_filename,
e.g. backbone.sm90.trt10.8.plan; sm100 is compute capability 10.0) or plainly `<graph>.plan`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from tokenizers import Tokenizer

from contracts.artifacts import ArtifactError, verify_manifest
from export.io_spec import IOSpec, ModelIO, load_io_spec
from serving.contract import check_task_name

GRAPHS = ("backbone", "adapter")
TOKENIZER_DIR = "tokenizer"
_ENGINE = re.compile(r"^(?P<graph>backbone|adapter)(?:\.sm(?P<major>\d+)(?P<minor>\d)\.trt(?P<trt>\d+\.\d+))?\.plan$")
_ONNX_TYPES = {
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
}


def onnx_files(path: Path) -> list[Path]:
    """The graph file and the external-data files it references, as they lie next to it."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return [path] + [path.parent / loc for loc in sorted(locations)]


def check_graph_io(path: Path, io: ModelIO) -> None:
    """Refuse a graph whose input/output names, dtypes or ranks differ from the I/O spec."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf DecodeError and friends: a garbled file behind a consistent manifest
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}); re-run `make export`") from None
    for kind, specs, values in (("input", io.inputs, graph.input), ("output", io.outputs, graph.output)):
        found = {v.name: v.type.tensor_type for v in values}
        for spec in specs:
            if spec.name not in found:
                raise ArtifactError(
                    f"{path}: io_spec.json names {kind} {spec.name!r}, the graph has {sorted(found)}; re-run `make export`"
                )
            t = found[spec.name]
            dtype, rank = _ONNX_TYPES.get(t.elem_type, str(t.elem_type)), len(t.shape.dim)
            if dtype != spec.dtype or rank != len(spec.shape):
                raise ArtifactError(
                    f"{path}: {kind} {spec.name} is {dtype} rank {rank}, io_spec.json says "
                    f"{spec.dtype} {spec.shape}; re-run `make export`"
                )


@dataclass(frozen=True)
class ExportedRun:
    """One verified export directory and what serving needs from it."""

    export_dir: Path
    engines_dir: Path
    spec: IOSpec
    manifest: dict

    @property
    def task(self) -> str:
        return self.spec.task

    def served_runtime(self, requested: str = "auto") -> str:
        """The CPU runtime to serve this export with: `requested`, or for auto parity.json's served_runtime.

        An export from before that choice existed (no key) is served exact, the rewrite equal to the checkpoint.
        """
        if requested != "auto":
            return requested
        report = self.export_dir / "parity.json"
        try:
            return json.loads(report.read_text()).get("served_runtime", "exact")
        except (OSError, ValueError, AttributeError):
            return "exact"

    def graph(self, name: str) -> Path:
        return self.export_dir / f"{name}.onnx"

    def graph_files(self, name: str) -> list[Path]:
        return onnx_files(self.graph(name))

    def graph_sha256(self, name: str) -> str:
        """One digest over the graph and its external data, from the (verified) manifest."""
        h = hashlib.sha256()
        for p in self.graph_files(name):
            rel = str(p.relative_to(self.export_dir))
            if rel not in self.manifest["files"]:
                raise ArtifactError(f"{p} is not listed in {self.export_dir}/manifest.json; re-run `make export`")
            h.update(rel.encode() + b"\0" + self.manifest["files"][rel]["sha256"].encode())
        return h.hexdigest()

    def tokenizer_sha256(self) -> str:
        h = hashlib.sha256()
        for rel, info in sorted(self.manifest["files"].items()):
            if rel.startswith(TOKENIZER_DIR + "/"):
                h.update(rel.encode() + b"\0" + info["sha256"].encode())
        return h.hexdigest()

    def input_limits(self, graph: str) -> dict[str, int]:
        """Bounds a direct caller of `graph` is held to: io_spec.json, else the export's tokenizer.

        Sequences: max_length (the tokenizer truncates to it; training checked it against the positions).
        Token ids: io_spec's vocab_size, else the tokenizer's vocabulary. Token types: io_spec's
        type_vocab_size, else 2 (a BERT tokenizer's segments 0 and 1).
        """
        s = self.spec
        limits = {"max_length": min(n for n in (s.max_length, s.max_positions) if n)}
        if graph == "backbone":
            limits["vocab_size"] = s.vocab_size or Tokenizer.from_file(
                str(self.export_dir / TOKENIZER_DIR / "tokenizer.json")
            ).get_vocab_size(with_added_tokens=True)
            if s.has_token_type_ids:
                limits["type_vocab_size"] = s.type_vocab_size or 2
        return limits

    def engines(self, name: str) -> dict[str | None, Path]:
        """TensorRT plans for graph `name`: compute capability ("9.0", or None for any) -> path.

        With plans from several TensorRT versions for one capability, the newest version wins.
        """
        found: dict[str | None, tuple[tuple[int, ...], Path]] = {}
        for p in sorted(self.engines_dir.glob("*.plan")) if self.engines_dir.is_dir() else []:
            m = _ENGINE.match(p.name)
            if m and m["graph"] == name:
                cc = f"{m['major']}.{m['minor']}" if m["major"] else None
                version = tuple(int(v) for v in m["trt"].split(".")) if m["trt"] else ()
                if cc not in found or version > found[cc][0]:
                    found[cc] = (version, p)
        return {cc: p for cc, (_, p) in found.items()}


def load_run(path: str | Path) -> ExportedRun:
    """`runs/<name>` or `runs/<name>/onnx` -> a verified ExportedRun; ArtifactError saying what is wrong."""
    path = Path(path)
    export_dir = path / "onnx" if (path / "onnx").is_dir() else path
    manifest = verify_manifest(export_dir, "onnx")
    spec = load_io_spec(export_dir)
    try:
        check_task_name(spec.task)
    except ValueError as e:
        raise ArtifactError(f"{export_dir}/io_spec.json: {e}") from None
    if len(spec.adapter.outputs) != 1 or spec.adapter.outputs[0].shape[-1] != len(spec.labels):
        raise ArtifactError(
            f"{export_dir}/io_spec.json: the adapter must have one (B, {len(spec.labels)}) logits output, "
            f"got {spec.adapter.outputs}"
        )
    if not (export_dir / TOKENIZER_DIR / "tokenizer.json").is_file():
        raise ArtifactError(
            f"{export_dir}/{TOKENIZER_DIR}/tokenizer.json is missing: the export must save a fast tokenizer"
        )
    for name in GRAPHS:
        if not (export_dir / f"{name}.onnx").is_file():
            raise ArtifactError(f"{export_dir}/{name}.onnx is missing; re-run `make export`")
        check_graph_io(export_dir / f"{name}.onnx", getattr(spec, name))
    return ExportedRun(export_dir, export_dir.parent / "engines", spec, manifest)
