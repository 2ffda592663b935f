"""Evaluation over a split, sharded across data-parallel ranks and gathered, so every rank sees every prediction."""

from __future__ import annotations

import torch

from .distributed import Dist, shard
from .metrics import PRIMARY, predictions, task_loss, task_metrics
from .router_stats import RouterStats
from .runtime import autocast, to_device


@torch.no_grad()
def evaluate(
    model,
    examples: list,
    loader_fn,
    device,
    amp: bool = True,
    router: RouterStats | None = None,
    d: Dist | None = None,
    task_type: str = "classification",
    num_classes: int = 2,
) -> dict:
    """Task metrics, the primary one, mean loss and predictions (in row order) over `examples`.

    Each rank takes every W-th row and the predictions are gathered. `loader_fn(rows)` batches rows
    in order; routing figures go into `router` (this rank's rows).
    """
    model.eval()
    d = d or Dist()
    positions, rows = shard(examples, d)
    preds, losses = [], 0.0
    for batch in loader_fn(rows):
        batch = to_device(batch, device)
        with autocast(device, amp):
            logits, aux = model(batch)
        if router is not None:
            router.add(aux, batch["attention_mask"])
        losses += task_loss(logits, batch["labels"], task_type, reduction="sum").item()
        preds += predictions(logits.cpu(), task_type)
    gathered = d.gather((positions, preds, losses))
    by_row = {p: y for pos, ys, _ in gathered for p, y in zip(pos, ys)}
    ordered = [by_row[i] for i in range(len(examples))]
    metrics = task_metrics(ordered, [e.label for e in examples], task_type, num_classes)
    return {
        "metrics": metrics,
        "primary": metrics[PRIMARY[task_type]],
        "accuracy": metrics.get("accuracy"),
        "loss": sum(g[2] for g in gathered) / max(len(examples), 1),
        "predictions": ordered,
    }
