"""Evaluation over a split, sharded across data-parallel ranks and gathered, so every rank sees every prediction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import Dist, shard
from .router_stats import RouterStats
from .runtime import autocast, to_device


@torch.no_grad()
def evaluate(model, examples: list, loader_fn, device, amp: bool = True, router: RouterStats | None = None,
             d: Dist = Dist()) -> dict:
    """Accuracy, mean loss and predictions (in row order) over `examples`; each rank takes every W-th row.

    `loader_fn(rows)` batches rows in order; routing figures go into `router` (this rank's rows).
    """
    model.eval()
    positions, rows = shard(examples, d)
    preds, losses = [], 0.0
    for batch in loader_fn(rows):
        batch = to_device(batch, device)
        with autocast(device, amp):
            logits, aux = model(batch)
        if router is not None:
            router.add(aux, batch["attention_mask"])
        losses += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        preds += logits.argmax(-1).cpu().tolist()
    gathered = d.gather((positions, preds, losses))
    by_row = {p: y for pos, ys, _ in gathered for p, y in zip(pos, ys)}
    predictions = [by_row[i] for i in range(len(examples))]
    n = len(examples)
    correct = sum(int(p == e.label) for p, e in zip(predictions, examples))
    return {"accuracy": correct / n if n else 0.0, "loss": sum(g[2] for g in gathered) / max(n, 1),
            "predictions": predictions}
