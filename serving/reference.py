"""The served pipeline run in-process with ONNX Runtime: the baseline for parity tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.ort_session import EXACT_ACCURACY_LEVEL, make_session
from serving.artifacts import TOKENIZER_DIR, load_run
from serving.postprocess import Prediction, decoder
from serving.tokenize import TextTokenizer


class InProcessClassifier:
    """tokenizer -> backbone -> adapter -> softmax on one export, same code and options as the server."""

    def __init__(
        self, run: str | Path, threads: int = 0, accuracy_level: int = EXACT_ACCURACY_LEVEL, runtime: str = "auto"
    ):
        self.run = load_run(run)
        spec = self.run.spec
        self.runtime = self.run.served_runtime(runtime)  # auto: what the server runs for this export
        self.tokenizer = TextTokenizer(self.run.export_dir / TOKENIZER_DIR, spec.max_length, spec.tokenizer_outputs)
        self.backbone = make_session(self.run.graph("backbone"), threads or None, accuracy_level, runtime=self.runtime)
        self.adapter = make_session(self.run.graph("adapter"), threads or None, accuracy_level, runtime=self.runtime)
        self.decoder = decoder(spec.labels, spec.task_type)

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        spec = self.run.spec
        feeds = self.tokenizer(texts, pairs)  # each (B, T)
        states = dict(
            zip(
                (t.name for t in spec.backbone.outputs),
                self.backbone.run([t.name for t in spec.backbone.outputs], feeds),
            )
        )
        available = {**feeds, **states}
        adapter_feeds = {t.name: available[t.name] for t in spec.adapter.inputs}
        (logits,) = self.adapter.run([spec.adapter.outputs[0].name], adapter_feeds)  # (B, C)
        return logits

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        return self.decoder.predictions(self.logits(texts, pairs))
