"""Where and how a run computes: seeding, device, autocast, moving batches, and training-step peak memory."""

from __future__ import annotations

import random
import resource
from contextlib import nullcontext

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class PeakMemory:
    """Peak memory of training steps only: evaluation (larger batches, no graph) is excluded on CUDA.

    On CUDA: torch.cuda.max_memory_allocated over training (reset around each evaluation).
    On CPU: the process's peak RSS (ru_maxrss), which cannot exclude evaluation.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self.static = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None  # weights at start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def pause(self) -> None:
        """Record the training peak so far, before an evaluation."""
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**30)

    def resume(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def gib(self) -> float:
        if self.device.type == "cuda":
            return self.peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
