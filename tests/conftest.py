"""Shared fixtures: a separable toy dataset and a tiny random BERT with the real MiniLM tokenizer."""

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["great", "wonderful", "brilliant", "superb", "delightful", "moving", "charming", "excellent"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "clumsy", "tedious", "painful", "dreadful"]
FILLER = ["the", "film", "movie", "plot", "actors", "story", "was", "really", "quite", "and", "a", "script"]


def write_toy_csv(path, n: int = 240, seed: int = 0) -> str:
    """A sentiment-like task a tiny model can learn: one polar word among filler words."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{label}")
    path = str(path)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """On shared cores two intra-op threads wait for each other's time slices; one thread is faster."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory):
    return write_toy_csv(tmp_path_factory.mktemp("data") / "toy.csv")


def tiny_overrides(data_path: str, out_name: str = "tiny") -> list[str]:
    """Overrides that make the default config a seconds-long run on the toy task."""
    return [
        f"name={out_name}",
        "backbone.name=tiny",
        "backbone.max_length=32",
        f"data.dataset={data_path}",
        "train.epochs=4",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.threads=2",
        "side.reduction=2",
        "side.num_heads=2",
        "quant.spsa_batches=1",
        "quant.spsa_steps=1",
        "moe.num_experts=4",  # the tiny tests' budgets were set with 4 experts (the default is 8)
    ]
