"""Evaluations: zero-shot classification, image↔text retrieval and linear probes."""
