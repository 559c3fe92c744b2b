"""Evaluation: classification metrics."""
