"""The explicit per-architecture map (training/architectures.py): T5 encoders end to end, and a clear
error at load for an architecture the code cannot handle."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2Model, T5Config, T5EncoderModel

from contracts.parity_report import PARITY_FILE, ExportReport
from tests.conftest import tiny_overrides
from training.architectures import ARCHITECTURES, layer_linears, tap_modules, tapped_layernorms
from training.backbone import BackboneTap, load_encoder, minilm_path
from training.config import BackboneConfig, ConfigError, load_config


def _save(model, tmp: Path) -> str:
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp)  # a tokenizer, for the pipeline
    return str(tmp)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    """A random 2-layer T5 encoder (RMSNorm, no biases, relative positions, no [CLS]) saved locally."""
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="relu")
    return _save(T5EncoderModel(cfg), tmp_path_factory.mktemp("tiny_t5"))


def test_an_unknown_architecture_fails_at_load_naming_what_is_missing(tmp_path):
    path = _save(GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=30522)), tmp_path)
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported .*training/architectures.py"):
        load_encoder(BackboneConfig(name=path, max_length=32), 30522)
    assert {"bert", "roberta", "distilbert", "mpnet", "t5"} <= set(ARCHITECTURES)


def test_t5_taps_are_its_hidden_states_and_its_linears_are_named(tiny_t5):
    encoder = load_encoder(BackboneConfig(name=tiny_t5, max_length=32), 30522).eval()
    assert type(encoder).__name__ == "T5EncoderModel"  # the encoder alone, not the encoder-decoder
    tap = BackboneTap(encoder, [1, 2], "frozen", "mean")
    ids, mask = torch.randint(5, 1000, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    got = {}
    tap.stream(ids, mask, None, lambda j, t: got.__setitem__(j, t))
    hs = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for j in range(3):  # the last tap is final_layer_norm's output, as in hidden_states
        torch.testing.assert_close(got[j], hs[j], rtol=0, atol=0)
    assert len(tap_modules(encoder, [1, 2])) == 3
    (q, k, v, o), (wi, wo) = layer_linears(encoder, 0)
    assert q.bias is None and wi.out_features == 64
    with pytest.raises(ConfigError, match="RMSNorm"):
        tapped_layernorms(encoder, [1, 2])


@pytest.mark.slow
def test_tiny_t5_trains_exports_through_the_parity_gate_and_answers_when_served(tiny_t5, tmp_path, toy_csv):
    from export.pipeline import ExportConfig, run_export
    from serving.client import Client
    from serving.config import ServeConfig
    from serving.repository import generate_repository
    from serving.server import ServerOptions, TritonServer
    from training.trainer import Trainer

    run = tmp_path / "t5"
    overrides = [o for o in tiny_overrides(toy_csv) if not o.startswith("backbone.name")]
    metrics = Trainer(
        load_config(overrides=[*overrides, f"backbone.name={tiny_t5}", "train.epochs=3", "train.threads=1"]),
        run,
        progress=False,
    ).run()
    assert metrics["backbone_bytes_ratio"] < 0.5  # GNP-IQ on T5's bias-free Linears and tied embedding
    run_export(run, ExportConfig(threads=1, compare_fp32_size=False, tensorrt="off"), log=lambda *a: None)
    report = ExportReport.load(run / "onnx" / PARITY_FILE)
    assert report.passed and report.gated().adapter.routes_observable
    repo = tmp_path / "model_repository"
    generate_repository([run], repo, ServeConfig(ort_threads=1))
    with TritonServer(ServerOptions.on_free_ports(repository=repo, log_file=tmp_path / "triton.log")) as server:
        with Client(server.grpc_url, "grpc") as client:
            (prediction,) = client.classify("toy", ["the film was really wonderful"])
    assert prediction.label in ("neg", "pos") and abs(sum(prediction.probabilities.values()) - 1) < 1e-5
