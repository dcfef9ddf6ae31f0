"""Analysis of trained models (gate audit)."""
