"""export/tensorrt_build.py: profiles, engine names, the 10.x / 11.x flag plan, and the missing-TensorRT path.

build_engine itself needs TensorRT and a GPU; here it is checked only for its clear failure without
TensorRT, and its wiring against a fake module shaped like the documented API (not evidence that
the real API matches, which only a TensorRT host can give).
"""

import sys
import types
from importlib.util import find_spec

import pytest

from export import tensorrt_build as tb
from export.io_spec import adapter_io, backbone_io
from tests import onnx_fixtures as fx

PROFILE = {"batch": [1, 8, 32], "sequence": [4, 128, 512]}


def test_profiles_from_the_io_spec():
    profiles = tb.optimization_profiles(backbone_io(hidden_size=8, num_taps=3, has_token_type_ids=True), PROFILE)
    assert [p.name for p in profiles] == ["input_ids", "attention_mask", "token_type_ids"]
    assert profiles[0] == tb.ProfileShape("input_ids", (1, 4), (8, 128), (32, 512))


def test_adapter_sequence_dim_is_not_second():
    """The axis names of the I/O spec say which dim is the sequence: dim 2 of hidden_states."""
    io = adapter_io(hidden_size=8, num_taps=3, num_labels=2)
    assert io.input("hidden_states").axes == ("batch", None, "sequence", None)
    hidden, cls, mask = tb.optimization_profiles(io, {"batch": [1, 4, 16], "sequence": [2, 64, 256]})
    assert hidden == tb.ProfileShape("hidden_states", (1, 3, 2, 8), (4, 3, 64, 8), (16, 3, 256, 8))  # (B, K, T, D)
    assert cls == tb.ProfileShape("cls_states", (1, 2, 8), (4, 2, 8), (16, 2, 8))
    assert mask.max == (16, 256)


@pytest.mark.parametrize(
    "batch,seq", [((2, 1, 4), (1, 2, 3)), ((1, 5, 4), (1, 2, 3)), ((1, 2, 3), (0, 2, 3)), ((1, 2, 3), (4, 3, 5))]
)
def test_bad_ranges_raise(batch, seq):
    io = backbone_io(hidden_size=8, num_taps=3, has_token_type_ids=False)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        tb.optimization_profiles(io, {"batch": list(batch), "sequence": list(seq)})


def _io(shape, axes=()):
    from export.io_spec import ModelIO, TensorSpec

    return ModelIO(inputs=(TensorSpec("x", "float32", shape, axes),), outputs=())


def test_bad_dims_raise():
    with pytest.raises(ValueError, match="dim 1 is 0"):
        tb.optimization_profiles(_io((-1, 0)), {"batch": [1, 1, 1]})
    with pytest.raises(ValueError, match="does not bound"):
        tb.optimization_profiles(_io((-1, -1)), {"batch": [1, 1, 1]})
    with pytest.raises(ValueError, match="must name exactly the -1 dims"):
        _io((-1, 4), ("batch", "sequence"))
    with pytest.raises(ValueError, match="min <= opt <= max per dim"):
        tb.ProfileShape("x", (1, 8), (1, 4), (1, 16))
    with pytest.raises(ValueError, match="ranks differ"):
        tb.ProfileShape("x", (1,), (1, 4), (1, 16))


def test_engine_filename():
    assert tb.engine_filename("backbone", (9, 0), "10.8.0.43") == "backbone.sm90.trt10.8.plan"
    assert tb.engine_filename("adapter", (8, 9), "11.0.1") == "adapter.sm89.trt11.0.plan"
    with pytest.raises(ValueError, match="major.minor"):
        tb.engine_filename("backbone", (9, 0), "ten")


@pytest.mark.parametrize(
    "precision,network_flags,builder_flags,strongly_typed",
    [
        ("fp32", (), (), False),
        ("fp16", (), ("FP16",), False),
        ("int8-weight", (), ("INT8", "FP16"), False),
        ("w8a8", (), ("INT8", "FP16"), False),
        ("int4-weight", ("STRONGLY_TYPED",), (), True),
    ],
)
def test_builder_plan_trt10(precision, network_flags, builder_flags, strongly_typed):
    plan = tb.builder_plan(10, precision)
    assert (plan["network_flags"], plan["builder_flags"], plan["strongly_typed"]) == (
        network_flags,
        builder_flags,
        strongly_typed,
    )
    assert plan["calibrator"] is None


@pytest.mark.parametrize("precision", tb.PRECISIONS)
def test_builder_plan_trt11_has_no_precision_flags(precision):
    plan = tb.builder_plan(11, precision)
    assert plan["strongly_typed"] and plan["builder_flags"] == () and plan["network_flags"] == ()
    assert plan["calibrator"] is None


def test_builder_plan_rejects_unknown():
    with pytest.raises(ValueError, match="precision"):
        tb.builder_plan(10, "int8")
    with pytest.raises(ValueError, match="not supported"):
        tb.builder_plan(8, "fp16")


def _build(tmp_path):
    onnx_path = fx.save(fx.int8_linear(), tmp_path, "backbone")
    profiles = tb.optimization_profiles(_io((-1, fx.K)), {"batch": [1, 2, 4]})
    return tb.build_engine(onnx_path, tmp_path / "engines", profiles, "int8-weight", tmp_path / "timing.cache")


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="a tensorrt package is installed on this host")
def test_tensorrt_absent_on_this_machine(tmp_path):
    assert tb.tensorrt_available() is False
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        _build(tmp_path)


@pytest.mark.parametrize("module", [None, types.ModuleType("tensorrt")], ids=["missing", "stub-wheel"])
def test_build_engine_without_tensorrt_raises_clearly(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    assert tb.tensorrt_available() is False
    with pytest.raises(RuntimeError) as err:
        _build(tmp_path)
    assert "TensorRT is not installed" in str(err.value) and "gpu` extra" in str(err.value)


# ---------------------------------------------------------------- wiring, against a fake tensorrt


class _Flags:
    def __init__(self, *names):
        for i, n in enumerate(names):
            setattr(self, n, i)


def _fake_tensorrt(version="10.8.0.43", parse_ok=True, calls=None):
    calls = {} if calls is None else calls

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return types.SimpleNamespace(name="x")

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return types.SimpleNamespace(
                node_name=lambda: "matmul_integer",
                node_operator=lambda: "MatMulInteger",
                node=lambda: 1,
                desc=lambda: "No importer registered",
                code=lambda: 8,
            )

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            calls.setdefault("flags", []).append(flag)

        def create_timing_cache(self, data):
            calls["cache_in"] = data
            return "cache"

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shapes

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timing")

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, mid, hi):
            self.shapes[name] = (lo, mid, hi)

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            return b"engine-bytes"

    return types.SimpleNamespace(
        __version__=version,
        Builder=Builder,
        OnnxParser=Parser,
        Logger=Logger,
        NetworkDefinitionCreationFlag=_Flags("STRONGLY_TYPED"),
        BuilderFlag=_Flags("FP16", "INT8"),
        MemoryPoolType=_Flags("WORKSPACE"),
    ), calls


def test_build_engine_wiring_with_fake_tensorrt(tmp_path, monkeypatch):
    trt, calls = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tb, "cuda_compute_capability", lambda device=0: (9, 0))
    path = _build(tmp_path)
    assert path == tmp_path / "engines" / "backbone.sm90.trt10.8.plan" and path.read_bytes() == b"engine-bytes"
    assert (tmp_path / "timing.cache").read_bytes() == b"timing" and calls["cache_in"] == b""
    assert calls["flags"] == [1, 0] and calls["network_flags"] == 0  # INT8, FP16; weakly typed on 10.x
    assert calls["profile"] == {"x": ((1, 64), (2, 64), (4, 64))} and calls["workspace"] == 4 << 30


def test_build_engine_reports_parser_errors_with_node_names(tmp_path, monkeypatch):
    trt, _ = _fake_tensorrt(parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(RuntimeError, match=r"matmul_integer \(MatMulInteger\): No importer registered"):
        _build(tmp_path)
