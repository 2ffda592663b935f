"""Generated configs carry exactly the I/O spec's names, dtypes and shapes."""

import json

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.io_spec import load_io_spec
from serving import model_config as mcfg
from serving.config import ServeConfig
from serving.contract import LABEL, PROBABILITIES, TEXT, TEXT_PAIR


def _io(config):
    return (
        {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in config.input},
        {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in config.output},
    )


def _spec_io(model_io):
    return (
        {t.name: (t.triton_dtype, list(t.shape[1:])) for t in model_io.inputs},
        {t.name: (t.triton_dtype, list(t.shape[1:])) for t in model_io.outputs},
    )


def test_backbone_and_adapter_follow_io_spec(fake_runs):
    spec = load_io_spec(fake_runs["nli"] / "onnx")
    cfg = ServeConfig(max_batch_size=16, max_queue_delay_us=500, backbone_instances=2)
    backbone = mcfg.onnx_python_config("backbone", spec.backbone, cfg, 2, "backbone.onnx")
    adapter = mcfg.onnx_python_config("adapter_nli", spec.adapter, cfg, 1, "adapter.onnx")
    assert _io(backbone) == _spec_io(spec.backbone) and _io(adapter) == _spec_io(spec.adapter)
    assert backbone.max_batch_size == 16 and backbone.instance_group[0].count == 2
    assert backbone.dynamic_batching.max_queue_delay_microseconds == 500
    assert backbone.parameters["onnx_file"].string_value == "backbone.onnx"
    assert all(t.allow_ragged_batch for t in backbone.input)  # the python model pads requests itself
    warm = adapter.model_warmup[0].inputs["hidden_states"]
    assert list(warm.dims) == [spec.num_taps, cfg.warmup_seq_len, spec.hidden_size] and warm.zero_data


def test_tokenizer_postprocess_and_ensemble(fake_runs):
    spec = load_io_spec(fake_runs["nli"] / "onnx")
    cfg = ServeConfig()
    tok = mcfg.tokenizer_config("tokenizer", spec, cfg, "tokenizer")
    assert _io(tok)[0] == {TEXT: ("TYPE_STRING", [1]), TEXT_PAIR: ("TYPE_STRING", [1])}
    assert _io(tok)[1] == _spec_io(spec.backbone)[0]
    assert tok.model_warmup[0].inputs[TEXT].input_data_file == TEXT
    post = mcfg.postprocess_config("postprocess_nli", spec, cfg)
    assert json.loads(post.parameters["labels"].string_value) == list(spec.labels)
    assert _io(post)[1] == {LABEL: ("TYPE_STRING", [1]), PROBABILITIES: ("TYPE_FP32", [len(spec.labels)])}
    ens = mcfg.ensemble_config(spec, cfg, "tokenizer", "backbone", "adapter_nli", "postprocess_nli")
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == [
        "tokenizer",
        "backbone",
        "adapter_nli",
        "postprocess_nli",
    ]


def test_warmup_file_is_a_serialized_string(fake_runs):
    files = mcfg.warmup_files(load_io_spec(fake_runs["sentiment"] / "onnx"))
    data = files[TEXT]
    assert int.from_bytes(data[:4], "little") == len(data) - 4 and data[4:].decode() == mcfg.WARMUP_TEXT


def test_tensorrt_config(fake_runs):
    spec = load_io_spec(fake_runs["sentiment"] / "onnx")
    config = mcfg.tensorrt_config(
        "backbone", spec.backbone, ServeConfig(target="gpu"), 1, {"9.0": "backbone_sm90.plan"}
    )
    assert config.platform == "tensorrt_plan" and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert config.cc_model_filenames["9.0"] == "backbone_sm90.plan" and not config.backend


def test_text_round_trip(fake_runs):
    spec = load_io_spec(fake_runs["sentiment"] / "onnx")
    config = mcfg.ensemble_config(
        spec, ServeConfig(), "tokenizer", "backbone", "adapter_sentiment", "postprocess_sentiment"
    )
    assert text_format.Parse(mcfg.to_text(config), mc.ModelConfig()) == config
