"""Data-parallel training on CPU with gloo and 2 processes: identical ranks, the same training as one
process at twice the per-process batch, and a checkpoint that export and regress accept."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import tiny_overrides
from training.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# Dropout off and the auxiliary routing losses off: those are per-process means over different
# token counts, so only the task loss is exactly the same function of a batch split in two.
EXACT = [
    "side.dropout=0.0",
    "moe.load_balance_coef=0.0",
    "moe.z_loss_coef=0.0",
    "train.batch_size=16",
    "train.epochs=2",
    "train.threads=1",
    "train.lr=3e-3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from training.trainer import Trainer

    trainer = Trainer(load_config(overrides=overrides), Path(out) / "run", progress=False)
    trainer.run()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    noise = trainer.requantizer.state_dict() if trainer.requantizer else {}
    torch.save({"state": state, "noise": noise}, Path(out) / f"rank{rank}.pt")
    trainer.dist.close()


def _train(world: int, overrides: list[str], out: Path) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), overrides, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def test_ranks_stay_identical_through_a_requantization_event(tmp_path, toy_csv):
    """After a GNP-IQ event (rows and noise drawn per (seed, event)) both ranks hold the same codes
    and parameters, although the int8 buffers are never broadcast after DDP's construction."""
    overrides = [
        *tiny_overrides(toy_csv),
        *EXACT[:3],
        "train.epochs=2",
        "quant.requant_every_epochs=1",
        "quant.spsa_steps=1",
        "train.threads=1",
    ]
    rank0, rank1 = _train(2, overrides, tmp_path)
    assert int(rank0["noise"]["events"]) == 1
    qweights = [k for k in rank0["state"] if k.endswith("qweight")]
    assert qweights and all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    assert all(torch.equal(rank0["noise"][k], rank1["noise"][k]) for k in rank0["noise"])  # SPSA moved alike
    assert (tmp_path / "run" / "checkpoint" / "manifest.json").is_file()  # written once, by rank 0


def test_two_processes_at_half_batch_train_like_one_at_full_batch(tmp_path, toy_csv):
    overrides = [*tiny_overrides(toy_csv), *EXACT, "quant.requant_every_epochs=1", "quant.spsa_steps=1"]
    (one,) = _train(1, overrides, tmp_path / "one")
    two, _ = _train(2, overrides, tmp_path / "two")
    trained = [k for k in one["state"] if k.startswith("adapter.")]
    assert trained
    for k in one["state"]:
        torch.testing.assert_close(two["state"][k].float(), one["state"][k].float(), rtol=0, atol=1e-5, msg=k)


def test_torchrun_checkpoint_passes_export_and_regress(tmp_path, toy_csv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    sets = [*tiny_overrides(toy_csv), "train.epochs=4", "train.lr=3e-3", "quant.requant_every_epochs=2"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "training",
        "--out",
        str(run),
        "--no-progress",
        *[a for s in sets for a in ("--set", s)],
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("checkpoint written") == 1 and "x 2 processes" in p.stdout
    for args in (
        ["export", "--run", str(run), "--threads", "1", "--no-fp32-size"],
        ["regress", "--run", str(run), "--update", "--threads", "1"],
        ["regress", "--run", str(run), "--threads", "1"],
    ):
        p = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-2000:])
