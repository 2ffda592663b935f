"""Data-parallel training over processes started by `torchrun` (or `accelerate launch`): the pieces the
trainer needs, and nothing when it runs alone.

- `Dist.from_env()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by both launchers) and joins the
  process group (gloo on CPU, nccl on CUDA); one process is world 1 and joins nothing.
- `ShardSampler` gives every rank its share of one permutation per epoch (seeded by seed + epoch):
  rank r takes positions r, r + W, ...; batches of B / W per rank therefore hold, together, exactly
  the rows one process would take in a batch of B, so 2 x (B/2) trains like 1 x B.
- Evaluation shards rows the same way without padding (no duplicates) and gathers predictions.
- Reductions for the trainer: the mean of a float (SPSA losses), the max (peak memory).
GNP-IQ needs nothing more: its events draw rows and noise from a generator seeded by (seed, event),
so every rank makes the same change; DDP is built with broadcast_buffers=False so the int8 codes
(buffers) are not re-sent every step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks (itself when alone)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def max(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """This rank's positions of an epoch's permutation of n rows (seed + epoch); equal counts on every rank.

    Rows past the largest multiple of the world size are left out of that epoch (at most W - 1),
    so every rank runs the same number of steps. With world 1 it is a plain seeded shuffle.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.n - self.n % self.world]
        return iter(order[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.n // self.world


def shard(rows: list, d: Dist) -> tuple[list[int], list]:
    """Evaluation: this rank's rows (positions d.rank, d.rank + W, ...) and their positions."""
    positions = list(range(d.rank, len(rows), d.world))
    return positions, [rows[i] for i in positions]
