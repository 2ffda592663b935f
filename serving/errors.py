"""Errors of the serving stage, one per thing that can be wrong."""

from __future__ import annotations


class InputError(ValueError):
    """A request's tensor is malformed (empty text, non-UTF-8 bytes, wrong shape): the caller's fault."""


class RepositoryError(ValueError):
    """A generated model repository is invalid: a config field, a missing file or broken ensemble wiring."""


class ServerError(RuntimeError):
    """tritonserver is missing, could not start, or died."""
