"""Experiments: the one-command variant comparison and its report."""
