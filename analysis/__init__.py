"""Evaluation, structure analysis and results tables."""
