"""TensorRT engine build for the exported graphs, TensorRT 10.x and 11.x (docs/DESIGN.md section 5).

The plain functions (optimization profiles, engine file names, the per-version flag plan) need no
TensorRT and are what the tests here cover. `build_engine` imports tensorrt lazily. It was written
against NVIDIA's documented Python API (Builder, OnnxParser, IBuilderConfig, the 10.x -> 11.x
migration guide) and has NOT been run: these machines have no TensorRT (the PyPI wheels are stubs)
and the GPU hosts lent here do not have it either. Its first real run is on a TensorRT host.

Version differences it follows (docs.nvidia.com/deeplearning/tensorrt, "Migrating from TensorRT 10.x
to 11.x"): 10.x networks are explicit-batch by default and weakly typed unless created with
NetworkDefinitionCreationFlag.STRONGLY_TYPED; 11.x removes BuilderFlag.FP16/INT8/FP8/BF16/INT4/FP4,
the precision-constraint flags and the INT8 calibrators, and every network is strongly typed (the
STRONGLY_TYPED flag is deprecated and ignored), so precision comes from the graph: Q/DQ nodes for
int8/int4 and fp16 tensors (e.g. ModelOpt AutoCast) for fp16.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8-weight", "w8a8", "int4-weight")
GIB = 1 << 30
MISSING_TENSORRT = (
    "TensorRT is not installed here (`import tensorrt` failed or found a stub without a Builder). "
    "Install the project's `gpu` extra from NVIDIA's package index on a machine with an NVIDIA GPU, "
    "or build there with `polygraphy convert` / `trtexec`."
)


@dataclass(frozen=True)
class ProfileShape:
    """One input's min / opt / max shape in a TensorRT optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"{self.name}: min/opt/max ranks differ: {self.min}, {self.opt}, {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 1 <= lo <= mid <= hi:
                raise ValueError(
                    f"{self.name}: need 1 <= min <= opt <= max per dim, got {self.min}, {self.opt}, {self.max}"
                )


def _check_range(what: str, lo: int, mid: int, hi: int) -> None:
    if not 1 <= lo <= mid <= hi:
        raise ValueError(f"{what}: need 1 <= min <= opt <= max, got {lo}, {mid}, {hi}")


def optimization_profiles(model_io, profile: dict) -> list[ProfileShape]:
    """One ProfileShape per input of an io_spec.ModelIO: each named axis ("batch", "sequence") takes its
    [min, opt, max] from `profile` (IOSpec.profile); static dims are fixed. The axis names come from the
    I/O spec, so the sequence need not be dim 1 (the adapter's hidden_states are (B, K, T, D))."""
    for axis, bounds in profile.items():
        _check_range(axis, *bounds)
    profiles = []
    for t in model_io.inputs:
        if not t.shape:
            raise ValueError(f"{t.name}: scalar inputs have no batch dimension")
        lo, mid, hi = [], [], []
        for i, (dim, axis) in enumerate(zip(t.shape, t.axes)):
            if axis is not None:
                if axis not in profile:
                    raise ValueError(f"{t.name}: dim {i} is the {axis!r} axis, which the profile does not bound")
                r = tuple(profile[axis])
            elif dim >= 1:
                r = (dim, dim, dim)
            else:
                raise ValueError(f"{t.name}: dim {i} is {dim}; use -1 for dynamic or a positive size")
            for acc, v in zip((lo, mid, hi), r):
                acc.append(v)
        profiles.append(ProfileShape(t.name, tuple(lo), tuple(mid), tuple(hi)))
    return profiles


def engine_filename(stem: str, compute_capability: tuple[int, int], trt_version: str) -> str:
    """`backbone.sm90.trt10.8.plan`: an engine only runs on the GPU arch and TensorRT it was built for."""
    m = re.match(r"^(\d+)\.(\d+)", trt_version)
    if not m:
        raise ValueError(f"TensorRT version must start with major.minor, got {trt_version!r}")
    major, minor = compute_capability
    return f"{stem}.sm{major}{minor}.trt{m.group(1)}.{m.group(2)}.plan"


def builder_plan(trt_major: int, precision: str) -> dict:
    """Network-creation flags and builder flags (TensorRT enum member names) for a precision.

    Returns {"trt_major", "precision", "strongly_typed", "network_flags", "builder_flags",
    "calibrator", "note"}. No plan uses a calibrator: quantization scales come from Q/DQ nodes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if trt_major < 10:
        raise ValueError(f"TensorRT {trt_major}.x is not supported; use 10.x or 11.x")
    plan = {"trt_major": trt_major, "precision": precision, "calibrator": None}
    if trt_major >= 11:
        note = {
            "fp16": "no FP16 flag in 11.x: the ONNX graph must already be fp16 (e.g. ModelOpt AutoCast)",
            "fp32": "fp32 graph, fp32 engine",
        }.get(precision, "precision from the graph's Q/DQ nodes")
        return {
            **plan,
            "strongly_typed": True,
            "network_flags": (),
            "builder_flags": (),
            "note": note + "; 11.x networks are always strongly typed (STRONGLY_TYPED is deprecated, ignored)",
        }
    if precision == "fp32":
        return {**plan, "strongly_typed": False, "network_flags": (), "builder_flags": (), "note": "fp32 engine"}
    if precision == "fp16":
        return {
            **plan,
            "strongly_typed": False,
            "network_flags": (),
            "builder_flags": ("FP16",),
            "note": "weak typing (deprecated since 10.12): TensorRT may choose fp16 kernels for an fp32 graph",
        }
    if precision in ("int8-weight", "w8a8"):
        return {
            **plan,
            "strongly_typed": False,
            "network_flags": (),
            "builder_flags": ("INT8", "FP16"),
            "note": "explicit Q/DQ graph, no calibrator; int8 weight-only DQ is folded to float at build, "
            "w8a8 gets INT8 GEMMs",
        }
    return {
        **plan,
        "strongly_typed": True,
        "network_flags": ("STRONGLY_TYPED",),
        "builder_flags": (),
        "note": "INT4 weight-only block-quantized DQ; precision from the graph",
    }


def tensorrt_available() -> bool:
    """True when a real tensorrt (one with a Builder) imports."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception:  # ImportError, or a stub wheel that raises on import
        return False
    return hasattr(trt, "Builder")


def _import_tensorrt():
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:
        raise RuntimeError(MISSING_TENSORRT) from e
    if not hasattr(trt, "Builder"):
        raise RuntimeError(MISSING_TENSORRT)
    return trt


def cuda_compute_capability(device: int = 0) -> tuple[int, int]:
    """(major, minor) of a CUDA device, via torch or else cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(device))
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 layout
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            cudart = None
    if cudart is not None:
        attrs = cudart.cudaDeviceAttr
        err, major = cudart.cudaDeviceGetAttribute(attrs.cudaDevAttrComputeCapabilityMajor, device)
        err2, minor = cudart.cudaDeviceGetAttribute(attrs.cudaDevAttrComputeCapabilityMinor, device)
        if err == err2 == cudart.cudaError_t.cudaSuccess:
            return int(major), int(minor)
    raise RuntimeError("no CUDA device found (need torch with CUDA or cuda-python) to name the engine")


# ---------------------------------------------------------------- the TensorRT build (not run here)


def _parse_onnx(trt, builder, plan: dict, onnx_path: Path, logger):
    flags = 0
    for name in plan["network_flags"]:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node_name = getattr(err, "node_name", lambda: "")() or f"node #{err.node()}"
            node_op = getattr(err, "node_operator", lambda: "")() or "?"
            errors.append(f"  - {node_name} ({node_op}): {err.desc()} [{err.code()}]")
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n" + "\n".join(errors or ["  (no details)"]))
    return network, parser


def _check_profile_names(network, profiles: list[ProfileShape]) -> None:
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    given = {p.name for p in profiles}
    if inputs != given:
        raise ValueError(f"profile inputs {sorted(given)} do not match the network's {sorted(inputs)}")


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    profiles: list[ProfileShape],
    precision: str,
    timing_cache: Path,
    workspace_gib: float = 4.0,
) -> Path:
    """Parse `onnx_path`, build one engine with one optimization profile, write `<stem>.smXY.trtA.B.plan`."""
    onnx_path, out_dir, timing_cache = Path(onnx_path), Path(out_dir), Path(timing_cache)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = _import_tensorrt()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")
    plan = builder_plan(int(trt.__version__.split(".")[0]), precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(trt, builder, plan, onnx_path, logger)
    _check_profile_names(network, profiles)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * GIB))
    for name in plan["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / engine_filename(onnx_path.stem, cuda_compute_capability(), trt.__version__)
    path.write_bytes(bytes(memoryview(serialized)))
    return path
