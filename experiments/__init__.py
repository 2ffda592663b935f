"""Experiments on the method (not the method itself): baselines compared over tasks and seeds, ablations.

Each run is a `python -m training` subprocess (experiments/harness.py), so a run here is exactly
what a user gets from `make train` with the same overrides.
"""
