"""Evaluation: metrics, predictions over data sets, before/after comparisons."""
