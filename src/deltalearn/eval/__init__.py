"""Evaluation of trained models: validation loss and perplexity (`deltalearn.eval.perplexity`),
and downstream tasks through lm-evaluation-harness (`deltalearn.eval.tasks`)."""

from deltalearn.eval.tasks import PAPER_SHOTS, PAPER_TASKS, evaluate_tasks

__all__ = ["PAPER_SHOTS", "PAPER_TASKS", "evaluate_tasks"]
