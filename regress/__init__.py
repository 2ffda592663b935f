"""`make regress`: re-measure a run from its artifacts and compare it with `RUN/baseline.json`.

Regression spans every stage (the checkpoint, the exported graphs, the served ensemble), so it
lives beside them rather than inside one:
  regress.measure   re-measures a run's figures (PyTorch, ONNX Runtime, tritonserver, latency)
  regress.rules     the comparison rules, tolerances and the table
  regress.baseline  the baseline file (read, written atomically)
  regress.cli       `python -m regress`
"""
