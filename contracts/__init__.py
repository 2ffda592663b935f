"""Contracts between the stages: the artifacts one stage writes and the next reads."""
