"""GNP-IQ events: only sampled rows change, exactly as a fresh quantization of (row + noise); SPSA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.config import QuantConfig
from training.quant import quantize_, quantize_rows
from training.requant import Requantizer


def quantized_mlp(cfg: QuantConfig, bits: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 7))
    quantize_(model, cfg)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bits", [8, 4])
def test_event_touches_only_sampled_rows_exactly(bits):
    cfg = QuantConfig(bits=bits, noise="fixed", requant_fraction=0.25, noise_mu_init=0.3, noise_rho_init=0.5)
    model = quantized_mlp(cfg)
    rq = Requantizer(model, cfg, seed=3, record=True)
    old = {n: (m.codes().clone(), m.scale.clone(), m.zero_point.clone(), m.dequantize()) for n, m in rq.modules.items()}
    log = rq.event(loss_fn=None)
    assert log["rows"] == sum(round(0.25 * m.num_rows) for m in rq.modules.values()) > 0
    sigma = F.softplus(torch.tensor(0.5)).item()
    for n, m in rq.modules.items():
        p = rq.last_picked[n]
        q0, s0, z0, w0 = old[n]
        keep = torch.ones(m.num_rows, dtype=torch.bool)
        keep[p.rows] = False
        assert torch.equal(m.codes()[keep], q0[keep])
        assert torch.equal(m.scale[keep], s0[keep]) and torch.equal(m.zero_point[keep], z0[keep])
        eps = s0[p.rows, None] * (0.3 + sigma * p.xi)
        q, s, z = quantize_rows(w0[p.rows] + eps, bits)
        assert torch.equal(m.codes()[p.rows], q)
        assert torch.equal(m.scale[p.rows], s) and torch.equal(m.zero_point[p.rows], z)
        assert not torch.equal(m.codes()[p.rows], q0[p.rows])


def test_events_are_reproducible_and_differ():
    cfg = QuantConfig(noise="fixed", requant_fraction=0.3)
    a, b = quantized_mlp(cfg), quantized_mlp(cfg)
    ra, rb = Requantizer(a, cfg, seed=1, record=True), Requantizer(b, cfg, seed=1, record=True)
    ra.event(None)
    rows0 = ra.last_picked["1"].rows.clone()
    rb.event(None)
    assert all(torch.equal(x, y) for x, y in zip(snapshot(a).values(), snapshot(b).values()))
    ra.event(None)
    assert not torch.equal(ra.last_picked["1"].rows, rows0)


def test_no_noise_is_idempotent():
    cfg = QuantConfig(noise="none", requant_fraction=1.0)
    model = quantized_mlp(cfg)
    codes = {n: m.codes().clone() for n, m in Requantizer(model, cfg).modules.items()}
    scales = {n: m.scale.clone() for n, m in Requantizer(model, cfg).modules.items()}
    rq = Requantizer(model, cfg)
    log = rq.event(loss_fn=lambda: 0.0)
    assert log["rows"] == 40 + 32 + 7 and log["spsa_losses"] == []
    for n, m in rq.modules.items():
        assert torch.equal(m.codes(), codes[n])
        assert torch.allclose(m.scale, scales[n], rtol=1e-6)


def test_log_reports_errors_against_reference():
    cfg = QuantConfig(noise="fixed", requant_fraction=0.5, noise_rho_init=1.0, keep_fp_reference=True)
    model = quantized_mlp(cfg)
    log = Requantizer(model, cfg).event(None)
    assert log["error_reference"] == "fp16"
    assert 0 < log["error_before"] < log["error_after"]
    assert 0 < log["rel_error_before"] < log["rel_error_after"] < 1
    assert log["event"] == 0 and log["mu_mean"] == 0.0
    assert log["sigma_mean"] == pytest.approx(F.softplus(torch.tensor(1.0)).item())

    cfg = QuantConfig(noise="fixed", requant_fraction=0.5, keep_fp_reference=False)
    log = Requantizer(quantized_mlp(cfg), cfg).event(None)
    assert log["error_reference"] == "dequantized_at_event_start"
    assert log["error_before"] == 0.0 and log["error_after"] > 0 and 0 < log["rel_error_after"] < 1


def test_spsa_moves_noise_and_restores_rows_between_evaluations():
    cfg = QuantConfig(noise="learned", requant_fraction=0.5, spsa_steps=3, spsa_lr=0.5, spsa_perturbation=0.25)
    model = quantized_mlp(cfg)
    rq = Requantizer(model, cfg, seed=0)
    start = snapshot(model)
    x = torch.randint(0, 40, (8,))
    target = model(x).detach()
    applied = []
    original_apply = rq._apply

    def apply(*args):  # every re-quantization (2 per SPSA step, then the final one) starts from the exact start
        assert all(torch.equal(start[k], v) for k, v in snapshot(model).items())
        applied.append(1)
        original_apply(*args)

    rq._apply = apply
    log = rq.event(lambda: F.mse_loss(model(x), target).item())
    assert len(applied) == 7 and len(log["spsa_losses"]) == 3
    assert all(lp != lm for lp, lm in log["spsa_losses"])
    assert any(abs(rq.mu[n].item()) > 0 for n in rq.mu) and any(rq.rho[n].item() != -1.0 for n in rq.rho)
    assert log["mu_mean"] == pytest.approx(sum(v.item() for v in rq.mu.values()) / len(rq.mu))

    # the final state is the re-quantization with the learned theta: rerun it with SPSA off
    final = snapshot(model)
    model.load_state_dict(start)
    rq2 = Requantizer(model, QuantConfig(noise="fixed", requant_fraction=0.5), seed=0)
    rq2.load_state_dict(rq.state_dict() | {"events": torch.tensor(0)})
    rq2.event(None)
    assert all(torch.equal(final[k], v) for k, v in snapshot(model).items())


@pytest.mark.parametrize("optimizer, least_move", [("adam", 0.04), ("sgd", 0.0)])
def test_spsa_adam_moves_mu_and_rho_by_about_its_rate(optimizer, least_move):
    """Loss differences of ~1e-5 barely move plain SPSA; Adam's normalised step moves ~spsa_lr per step."""
    cfg = QuantConfig(noise="learned", requant_fraction=0.5, spsa_steps=2, spsa_lr=0.05, spsa_optimizer=optimizer)
    model = quantized_mlp(cfg)
    rq = Requantizer(model, cfg, seed=0)
    x = torch.randint(0, 40, (8,))
    target = model(x).detach()
    rq.event(lambda: 1e-4 * F.mse_loss(model(x), target).item())  # a loss as flat as the real one
    moved = max(max(abs(rq.mu[n].item()), abs(rq.rho[n].item() + 1.0)) for n in rq.mu)
    assert moved > least_move and (optimizer == "adam" or moved < 1e-3)


def test_state_dict_round_trip():
    cfg = QuantConfig()
    model = quantized_mlp(cfg)
    rq = Requantizer(model, cfg)
    rq.mu["1"].fill_(0.7)
    rq.event(None)
    other = Requantizer(model, cfg)
    other.load_state_dict(rq.state_dict())
    assert other.events == 1 and other.mu["1"].item() == pytest.approx(0.7)
    assert set(rq.state_dict()) == (
        {"events", "spsa_adam.m", "spsa_adam.v", "spsa_adam.t"}
        | {f"{n}.{k}" for n in ("0", "1", "3") for k in ("mu", "rho")}
    )


def test_reference_base_requantizes_from_fp_copy():
    cfg = QuantConfig(noise="none", requant_fraction=1.0, keep_fp_reference=True)
    model = quantized_mlp(cfg)
    rq = Requantizer(model, cfg, base="reference")
    rq.event(None)
    for m in rq.modules.values():  # every row is now a fresh quantization of the fp16 copy
        q, s, z = quantize_rows(m.reference.float(), m.bits)
        assert torch.equal(m.codes(), q) and torch.equal(m.scale, s) and torch.equal(m.zero_point, z)
    with pytest.raises(ValueError):
        Requantizer(quantized_mlp(QuantConfig(keep_fp_reference=False)), cfg, base="reference")
