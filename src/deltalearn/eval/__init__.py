"""Evaluation of trained models (validation loss and perplexity)."""
