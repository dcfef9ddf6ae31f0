"""Interoperability with other codebases' checkpoints."""

from deltalearn.compat.official import load_official

__all__ = ["load_official"]
