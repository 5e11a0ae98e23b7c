"""Evaluations: zero-shot classification and image↔text retrieval."""
