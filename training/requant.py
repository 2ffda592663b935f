"""GNP-IQ events: iterative noisy re-quantization of random backbone rows (docs/DESIGN.md section 4).

At each event, for every quantized tensor t a random share p of its rows is picked and each picked
row is re-quantized from its current value plus Gaussian noise in units of its scale:
`eps = s_row * (mu_t + softplus(rho_t) * xi)`, `xi ~ N(0, 1)`; rows not picked are untouched.

mu_t and rho_t are learned per tensor without autograd, because the backbone is frozen and
outside the gradient path in the default mode. The estimator is SPSA with antithetic
perturbations: one Rademacher vector delta over all (mu_t, rho_t), the loss at theta + c*delta and
at theta - c*delta, and the gradient estimate `g = (L+ - L-) / (2c) * delta`. Two forward passes
per step whatever the number of tensors. The step is Adam's on g (`spsa_optimizer=adam`, default):
re-quantizing 5% of rows moves the task loss by ~1e-5, so a plain `theta -= lr * g` (`sgd`) moved
mu and rho by ~1e-7 per event, i.e. "learned" noise stayed fixed; Adam's normalised step moves
them by about `spsa_lr` per step in the direction the estimates agree on. Common random numbers keep the estimate low-variance: the picked
rows and xi are drawn once per event and shared by every evaluation (and `loss_fn` should run the
same batches, in eval mode, at each call), so L+ - L- only measures the change of theta. Between
evaluations the picked rows are restored bit-exactly from a snapshot. The picked rows, xi and
the SPSA deltas come from a CPU torch.Generator seeded from (seed, event index), so an event is
reproducible on any device and after a resume (the event index is in the state_dict).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import QuantConfig
from training.quant import QUANTIZED_TYPES, quant_error, quantize_rows


def _sq_norm(m: nn.Module, chunk: int = 4096) -> float:
    """||W_hat||_F^2, dequantizing a chunk of rows at a time."""
    rows, dev = m.num_rows, m.qweight.device
    return sum(
        m.gather_rows(torch.arange(i, min(i + chunk, rows), device=dev)).pow(2).sum().item()
        for i in range(0, rows, chunk)
    )


class _Picked:
    """One tensor's rows for this event: indices, snapshot for an exact restore, the fixed noise."""

    def __init__(self, module: nn.Module, rows: Tensor, xi: Tensor, base: str):
        self.module, self.rows = module, rows  # rows (k,) on the module's device
        self.qweight = module.qweight[rows].clone()  # packed codes (k, C or ceil(C/2))
        self.scale = module.scale[rows].clone()  # (k,)
        self.zero_point = module.zero_point[rows].clone()
        self.start = module.gather_rows(rows)  # (k, C) float32: dequantized at the start of the event
        if base == "reference":
            self.base = module.reference[rows.cpu()].to(rows.device, torch.float32)
        else:
            self.base = self.start
        self.xi = xi  # (k, C)

    def noise(self, mu: float, sigma: float) -> Tensor:
        return self.scale[:, None] * (mu + sigma * self.xi)  # (k, C)

    def restore(self) -> None:
        self.module.qweight[self.rows] = self.qweight
        self.module.scale[self.rows] = self.scale
        self.module.zero_point[self.rows] = self.zero_point


class Requantizer:
    """Re-quantization events over every quantized module of `model`, with per-tensor noise (mu_t, rho_t).

    base="dequantized" (default) re-quantizes from the current dequantized rows; base="reference"
    from the fp16 CPU copy (needs keep_fp_reference), which keeps the weights anchored to the
    pretrained ones instead of drifting from event to event.
    """

    def __init__(
        self, model: nn.Module, cfg: QuantConfig, seed: int = 0, base: str = "dequantized", record: bool = False
    ):
        if base not in ("dequantized", "reference"):
            raise ValueError(f"base must be 'dequantized' or 'reference', got {base!r}")
        self.cfg, self.seed, self.base, self.record = cfg, seed, base, record
        self.modules: dict[str, nn.Module] = {}
        seen: set[int] = set()
        for name, m in model.named_modules():
            if isinstance(m, QUANTIZED_TYPES) and m.qweight.data_ptr() not in seen:  # tied weights once
                seen.add(m.qweight.data_ptr())
                self.modules[name] = m
        if base == "reference" and any(m.reference is None for m in self.modules.values()):
            raise ValueError("base='reference' needs keep_fp_reference")
        self.mu = {n: torch.tensor(float(cfg.noise_mu_init)) for n in self.modules}
        self.rho = {n: torch.tensor(float(cfg.noise_rho_init)) for n in self.modules}
        with_ref = bool(self.modules) and all(m.reference is not None for m in self.modules.values())
        self._ref_norm = (
            {n: m.reference.float().pow(2).sum().item() for n, m in self.modules.items()} if with_ref else None
        )
        self.events = 0
        self._adam = {
            "m": torch.zeros(len(self.modules), 2),
            "v": torch.zeros(len(self.modules), 2),
            "t": torch.tensor(0),
        }  # Adam moments of the SPSA estimates, over all events
        self.last_picked: dict[str, _Picked] = {}  # only filled when record=True (tests, debugging)

    def state_dict(self) -> dict[str, Tensor]:
        d = {f"{n}.mu": v.clone() for n, v in self.mu.items()}
        d.update({f"{n}.rho": v.clone() for n, v in self.rho.items()})
        d.update({f"spsa_adam.{k}": v.clone() for k, v in self._adam.items()})
        d["events"] = torch.tensor(self.events)
        return d

    def _step(self, theta: Tensor, g: Tensor) -> Tensor:
        """One SPSA update of theta (T, 2) from the estimate g (T, 2)."""
        lr = self.cfg.spsa_lr
        if self.cfg.spsa_optimizer == "sgd":
            return theta - lr * g
        b1, b2, a = 0.9, 0.999, self._adam
        a["t"] = a["t"] + 1
        a["m"] = b1 * a["m"] + (1 - b1) * g
        a["v"] = b2 * a["v"] + (1 - b2) * g * g
        m_hat, v_hat = a["m"] / (1 - b1 ** int(a["t"])), a["v"] / (1 - b2 ** int(a["t"]))
        return theta - lr * m_hat / (v_hat.sqrt() + 1e-12)

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        for n in self.modules:
            self.mu[n] = d[f"{n}.mu"].detach().float().clone()
            self.rho[n] = d[f"{n}.rho"].detach().float().clone()
        for k in self._adam:
            if f"spsa_adam.{k}" in d:
                self._adam[k] = d[f"spsa_adam.{k}"].detach().clone()
        self.events = int(d["events"])

    def _pick(self, gen: torch.Generator) -> dict[str, _Picked]:
        picked = {}
        for n, m in self.modules.items():
            rows, cols = m.num_rows, m.num_cols
            k = math.floor(self.cfg.requant_fraction * rows + 0.5)
            if k == 0:
                continue
            idx = torch.randperm(rows, generator=gen)[:k].sort().values
            xi = torch.randn(k, cols, generator=gen)
            dev = m.qweight.device
            picked[n] = _Picked(m, idx.to(dev), xi.to(dev), self.base)
        return picked

    def _apply(self, picked: dict[str, _Picked], mu: dict[str, float], rho: dict[str, float]) -> None:
        for n, p in picked.items():
            w = p.base
            if self.cfg.noise != "none":
                w = w + p.noise(mu[n], F.softplus(torch.tensor(rho[n])).item())
            q, s, z = quantize_rows(w, p.module.bits, self.cfg.rounding)
            p.module.set_rows(p.rows, q, s, z)

    def _error(self, picked: dict[str, _Picked], start_norm: float) -> tuple[float, float]:
        """Eq. 4 summed over tensors: (absolute, relative to the summed ||W_ref||_F^2)."""
        if self._ref_norm is not None:  # vs the fp16 reference
            err = sum(quant_error(m)[0] for m in self.modules.values())
            return err, err / max(sum(self._ref_norm.values()), 1e-30)
        # vs the weights dequantized at the start of the event: only picked rows can differ
        err = sum((p.start - p.module.gather_rows(p.rows)).pow(2).sum().item() for p in picked.values())
        return err, err / max(start_norm, 1e-30)

    @torch.no_grad()
    def event(self, loss_fn: Callable[[], float] | None) -> dict:
        """One GNP-IQ event; SPSA on (mu, rho) first when cfg.noise == 'learned' and loss_fn is given."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.events)
        picked = self._pick(gen)
        start_norm = 0.0 if self._ref_norm is not None else sum(_sq_norm(m) for m in self.modules.values())
        before = self._error(picked, start_norm)
        names = list(self.mu)
        theta = (
            torch.stack([torch.stack([self.mu[n], self.rho[n]]) for n in names]) if names else torch.zeros(0, 2)
        )  # (T, 2)
        losses = []
        if cfg.noise == "learned" and loss_fn is not None and picked:
            c = cfg.spsa_perturbation
            active = torch.tensor([[float(n in picked)] for n in names])  # (T, 1): tensors with no row stay put
            for _ in range(cfg.spsa_steps):
                delta = (torch.randint(0, 2, theta.shape, generator=gen).float() * 2 - 1) * active  # (T, 2), +-1
                pair = []
                for sign in (1.0, -1.0):
                    th = theta + sign * c * delta
                    self._apply(picked, *self._split(names, th))
                    pair.append(float(loss_fn()))
                    for p in picked.values():
                        p.restore()
                losses.append(tuple(pair))
                if all(math.isfinite(v) for v in pair):
                    theta = self._step(theta, (pair[0] - pair[1]) / (2 * c) * delta)
            for i, n in enumerate(names):
                self.mu[n], self.rho[n] = theta[i, 0].clone(), theta[i, 1].clone()
        self._apply(picked, *self._split(names, theta))
        after = self._error(picked, start_norm)
        self.last_picked = picked if self.record else {}
        log = {
            "event": self.events,
            "rows": sum(len(p.rows) for p in picked.values()),
            "noise": cfg.noise,
            "error_reference": "fp16" if self._ref_norm is not None else "dequantized_at_event_start",
            "error_before": before[0],
            "rel_error_before": before[1],
            "error_after": after[0],
            "rel_error_after": after[1],
            "spsa_losses": losses,
            "mu_mean": theta[:, 0].mean().item() if names else 0.0,
            "sigma_mean": F.softplus(theta[:, 1]).mean().item() if names else 0.0,
        }
        self.events += 1
        return log

    @staticmethod
    def _split(names: list[str], theta: Tensor) -> tuple[dict[str, float], dict[str, float]]:
        return (
            {n: theta[i, 0].item() for i, n in enumerate(names)},
            {n: theta[i, 1].item() for i, n in enumerate(names)},
        )
