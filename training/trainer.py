"""The training loop shared by MP-ISMoE, its ablations and every baseline.

AdamW with warmup + linear decay, gradient clipping, bf16 autocast on CUDA, evaluation every
epoch, best-on-validation weights, GNP-IQ re-quantization events every M epochs, a per-step JSONL
log, curves / routing / GNP-IQ PNGs, and `metrics.json` with the task's metrics (training/metrics.py),
peak memory and step time. Classification trains with cross-entropy, regression with MSE.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbone import load_tokenizer
from .checkpoint import CALIBRATION_FILE, CALIBRATION_ROWS, HELDOUT_FILE, examples_jsonl, save_checkpoint
from .config import RunConfig
from .data import describe, load_splits, make_loader
from .distributed import Dist, ShardSampler
from .evaluation import evaluate
from .metrics import PRIMARY, task_loss
from .model import SideTuned, aux_loss, backbone_bytes, build_model, trainable_parameters
from .plots import plot_curves, plot_noise, plot_router
from .prior_init import kmeans_prior_init_
from .router_stats import RouterStats
from .runtime import PeakMemory, autocast, pick_device, seed_everything, to_device

PROBE_SEED_OFFSET = 7919  # SPSA and k-means batches come from their own generator: the training order is untouched


def linear_warmup_decay(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then linear decay to 0 (transformers' schedule, without importing its trainer stack)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, cfg: RunConfig):
    """AdamW; no weight decay on biases and norms; the classifier head at train.head_lr when set."""
    head_lr = cfg.train.head_lr or cfg.train.lr
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = 0.0 if p.ndim < 2 or "norm" in name.lower() else cfg.train.weight_decay
            lr = head_lr if "classifier" in name else cfg.train.lr
            groups.setdefault((lr, decay), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()], lr=cfg.train.lr
    )


def snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Trainer:
    """One training run: data, model, loop, checkpoint. `run()` returns the metrics dict."""

    def __init__(self, cfg: RunConfig, out_dir: Path, progress: bool = True):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.device = pick_device(cfg.train.device)
        self.dist = Dist.from_env(self.device.type)  # torchrun / accelerate launch; world 1 otherwise
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.enabled and cfg.train.batch_size % self.dist.world:
            raise ValueError(f"train.batch_size {cfg.train.batch_size} must divide among {self.dist.world} processes")
        threads = cfg.train.threads or (max(1, (os.cpu_count() or 1) // self.dist.world) if self.dist.enabled else None)
        if threads:
            torch.set_num_threads(threads)
        self.progress = progress and self.dist.is_main
        seed_everything(cfg.train.seed)
        self.splits = load_splits(cfg.data)
        self.tokenizer = load_tokenizer(cfg.backbone)
        self.model, self.info = build_model(cfg, len(self.splits.labels), self.tokenizer)
        self.model.to(self.device)
        self.requantizer = self._requantizer()
        self.sampler = ShardSampler(len(self.splits.train), cfg.train.seed, self.dist.rank, self.dist.world)
        self.train_loader = make_loader(
            self.splits.train,
            self.tokenizer,
            cfg.backbone.max_length,
            cfg.train.batch_size // self.dist.world,
            False,
            sampler=self.sampler,
            pad_to_max_length=cfg.backbone.pad_to_max_length,
        )
        self.probe_loader = make_loader(
            self.splits.train,
            self.tokenizer,
            cfg.backbone.max_length,
            cfg.train.batch_size,
            True,
            cfg.train.seed + PROBE_SEED_OFFSET,
            cfg.backbone.pad_to_max_length,
        )
        self.eval_loader = lambda rows: make_loader(
            rows,
            self.tokenizer,
            cfg.backbone.max_length,
            cfg.train.eval_batch_size,
            False,
            pad_to_max_length=cfg.backbone.pad_to_max_length,
        )
        self.log_path = self.out_dir / "train_log.jsonl" if self.dist.is_main else Path(os.devnull)
        self.ddp = None  # the DistributedDataParallel wrapper, built in run() after the prior's k-means init

    def _forward(self, batch: dict):
        return (self.ddp or self.model)(batch)

    def _wrap(self) -> None:
        """DDP over the trainable parameters; int8 codes are buffers and are not broadcast every step
        (every rank changes them identically at GNP-IQ events). Experts without tokens in a batch and
        frozen parts leave parameters unused, hence find_unused_parameters."""
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(
                self.model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
            )

    def _requantizer(self):
        q = self.cfg.quant
        if not (isinstance(self.model, SideTuned) and q.enabled and q.requant_every_epochs and q.noise != "none"):
            return None
        from .requant import Requantizer

        return Requantizer(self.model.tap.encoder, q, self.cfg.train.seed, base=q.requant_base)

    def _probe_batches(self, n: int) -> list[dict]:
        """n training batches from the probe loader (its own generator), on the device."""
        return [to_device(b, self.device) for _, b in zip(range(n), self.probe_loader)]

    def _init_prior(self) -> None:
        """k-means representatives for the ISMoE prior from the salient tokens of 8 training batches."""
        moe = self.cfg.moe
        if isinstance(self.model, SideTuned) and moe.enabled and moe.prior and moe.prior_init == "kmeans":
            n = kmeans_prior_init_(self.model, self._probe_batches(8), self.cfg.train.seed)
            self._say(f"[train] prior representatives of {n} MoE blocks from k-means of salient tokens")

    def _spsa_loss_fn(self):
        """Task loss on a few fixed training batches, forward only: the SPSA objective."""
        batches = self._probe_batches(self.cfg.quant.spsa_batches)

        @torch.no_grad()
        def loss_fn() -> float:
            self.model.eval()
            total = 0.0
            for b in batches:
                with autocast(self.device, self.cfg.train.amp):
                    logits, _ = self.model(b)
                total += task_loss(logits, b["labels"], self.splits.task_type).item()
            return self.dist.mean(total / len(batches))  # every rank takes the same SPSA step

        return loss_fn

    def _train_epoch(self, epoch, optimizer, scheduler, log, step_times, global_step):
        cfg = self.cfg.train
        self.model.train()
        self.sampler.set_epoch(epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.progress, leave=False)
        losses = []
        for batch in bar:
            t0 = time.perf_counter()
            batch = to_device(batch, self.device)
            with autocast(self.device, cfg.amp):
                logits, aux = self._forward(batch)
            main_loss = task_loss(logits, batch["labels"], self.splits.task_type)
            loss = main_loss + aux_loss(aux, self.cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            global_step += 1
            losses.append(main_loss.item())
            if global_step % cfg.log_every == 0:
                log.write(
                    json.dumps(
                        {
                            "step": global_step,
                            "epoch": epoch + 1,
                            "loss": loss.item(),
                            "task_loss": main_loss.item(),
                            "lr": scheduler.get_last_lr()[0],
                            "step_time_s": step_times[-1],
                        }
                    )
                    + "\n"
                )
                bar.set_postfix(loss=f"{statistics.fmean(losses[-cfg.log_every :]):.4f}")
            if cfg.max_steps and global_step >= cfg.max_steps:
                break
        return global_step, statistics.fmean(losses) if losses else float("nan")

    def run(self) -> dict:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        optimizer = make_optimizer(self.model, cfg)
        steps = cfg.train.epochs * len(self.train_loader)
        if cfg.train.max_steps:
            steps = min(steps, cfg.train.max_steps)
        scheduler = linear_warmup_decay(optimizer, int(cfg.train.warmup_ratio * steps), steps)
        self._init_prior()
        self._wrap()
        memory = PeakMemory(self.device)
        ranks = f" x {self.dist.world} processes" if self.dist.enabled else ""
        self._say(
            f"[train] {cfg.train.method} on {describe(self.splits)}; device {self.device}{ranks}; "
            f"{trainable_parameters(self.model):,} trainable parameters"
        )
        spsa_loss = self._spsa_loss_fn() if self.requantizer and cfg.quant.noise == "learned" else None
        epochs, events, step_times, global_step = [], [], [], 0
        best = {"primary": -math.inf}
        metric = PRIMARY[self.splits.task_type]
        t_start = time.perf_counter()
        with open(self.log_path, "w", buffering=1) as log:  # line-buffered: `tail -f` shows progress
            for epoch in range(cfg.train.epochs):
                t0 = time.perf_counter()
                global_step, train_loss = self._train_epoch(epoch, optimizer, scheduler, log, step_times, global_step)
                memory.pause()
                router = RouterStats()
                val = self._evaluate(self.splits.val, router)
                memory.resume()
                routing = router.summary(self.model)
                if routing["blocks"]:
                    log.write(json.dumps({"event": "router", "epoch": epoch + 1, **routing}) + "\n")
                record = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    f"val_{metric}": val["primary"],
                    "val_loss": val["loss"],
                    "time_s": time.perf_counter() - t0,
                }
                epochs.append(record)
                log.write(json.dumps({"event": "eval", **record}) + "\n")
                self._say(
                    f"[train] epoch {epoch + 1}: train loss {self.dist.mean(train_loss):.4f}  "
                    f"val {metric} {val['primary']:.4f}"
                )
                if val["primary"] > best["primary"]:
                    best = {
                        "primary": val["primary"],
                        "metrics": val["metrics"],
                        "epoch": epoch + 1,
                        "state": snapshot(self.model),
                        "noise": self._noise_state(),
                    }
                last = epoch + 1 == cfg.train.epochs or (cfg.train.max_steps and global_step >= cfg.train.max_steps)
                if self.requantizer and (epoch + 1) % cfg.quant.requant_every_epochs == 0 and not last:
                    event = self.requantizer.event(spsa_loss)
                    memory.pause()
                    events.append(event)
                    record = {k: v for k, v in _jsonable(event).items() if k != "event"}
                    log.write(json.dumps({"event": "requant", "index": event["event"], **record}) + "\n")
                if last:
                    break
        train_time = time.perf_counter() - t_start
        peak, peak_kind, static_memory = self.dist.max(memory.gib()), memory.kind, memory.static  # the largest rank
        self.model.load_state_dict(best["state"])
        test = self._evaluate(self.splits.test)
        metrics = self._metrics(test, best, epochs, events, step_times, train_time, peak, peak_kind, static_memory)
        if self.dist.is_main:  # one writer: checkpoint, manifest, metrics, plots
            self._write_outputs(metrics, best)
        self.dist.barrier()
        return metrics

    def _evaluate(self, examples: list, router: RouterStats | None = None) -> dict:
        return evaluate(
            self.model,
            examples,
            self.eval_loader,
            self.device,
            self.cfg.train.amp,
            router,
            self.dist,
            self.splits.task_type,
            len(self.splits.labels),
        )

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, flush=True)

    def _noise_state(self) -> dict:
        return {k: v.clone() for k, v in self.requantizer.state_dict().items()} if self.requantizer else {}

    def _metrics(self, test, best, epochs, events, step_times, train_time, peak, peak_kind, static_memory) -> dict:
        qbytes = backbone_bytes(self.model)
        return {
            "task": self.splits.name,
            "method": self.cfg.train.method,
            "labels": self.splits.labels,
            "task_type": self.splits.task_type,
            "primary_metric": PRIMARY[self.splits.task_type],
            "test_metrics": test["metrics"],
            "val_metrics": best["metrics"],
            **(
                {"test_accuracy": test["accuracy"], "val_accuracy": best["metrics"]["accuracy"]}
                if self.splits.task_type == "classification"
                else {}
            ),
            "best_epoch": best["epoch"],
            "test_size": len(self.splits.test),
            "epochs": epochs,
            "trainable_parameters": trainable_parameters(self.model),
            "backbone_bytes": qbytes,
            "backbone_fp32_bytes": self.info.fp32_bytes,
            "backbone_bytes_ratio": qbytes / self.info.fp32_bytes,
            "peak_memory_gib": peak,
            "peak_memory_kind": peak_kind,
            "static_memory_gib": static_memory,
            "step_time_s_median": statistics.median(step_times) if step_times else None,
            "train_time_s": train_time,
            "requant_events": [_jsonable(e) for e in events],
            "device": str(self.device),
            "cpu_threads": torch.get_num_threads(),
            "processes": self.dist.world,
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
        }

    def _write_outputs(self, metrics: dict, best: dict) -> None:
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_curves(self.log_path, self.out_dir / "curves.png", title=f"{self.cfg.name}: {self.cfg.train.method}")
        plot_router(self.log_path, self.out_dir / "router.png", title=f"{self.cfg.name}: routing per epoch")
        plot_noise(self.log_path, self.out_dir / "gnp_iq.png", title=f"{self.cfg.name}: GNP-IQ events")
        if isinstance(self.model, SideTuned):
            save_checkpoint(
                self.out_dir,
                self.model,
                self.cfg,
                self.info,
                self.tokenizer,
                self.splits.labels,
                self.splits.name,
                self.splits.text_pair,
                metrics,
                best["noise"],
                extra_files={
                    HELDOUT_FILE: examples_jsonl(self.splits.test, self.splits.labels),
                    CALIBRATION_FILE: examples_jsonl(self.splits.train[:CALIBRATION_ROWS], self.splits.labels),
                },
                task_type=self.splits.task_type,
            )
            print(f"[train] checkpoint written to {self.out_dir / 'checkpoint'}", flush=True)
        primary = metrics["primary_metric"]
        print(
            f"[train] test {primary} {metrics['test_metrics'][primary]:.4f}; backbone bytes ratio "
            f"{metrics['backbone_bytes_ratio']:.3f}; peak memory {metrics['peak_memory_gib']:.2f} GiB "
            f"({metrics['peak_memory_kind']})",
            flush=True,
        )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 16 else f"tensor{tuple(obj.shape)}"
    return obj
