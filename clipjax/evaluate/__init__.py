"""Evaluations: zero-shot classification, image↔text retrieval and linear probes.

`KINDS` is the one registry of evaluation kinds (a `config.evals` entry's `kind`). Each kind's
module holds its own config fields with their defaults (`FIELDS`), its metric names
(`METRICS`), and the two steps `evaluator.Evaluator` runs for it: `prepare(evaluation, data)`
once, when the data is loaded, and `score(evaluation, prepared, embed)` at each evaluation;
and `chance_levels(evaluation, prepared)`, what `score` gives a model that guesses.
`fields(kind)` adds the fields every kind has.
"""

from clipjax.evaluate import linear_probe, retrieval, zeroshot

KINDS = {"zeroshot": zeroshot, "retrieval": retrieval, "linear_probe": linear_probe}
# The fields of every kind: what to read, how many examples (-1: all), the embedding batch.
COMMON_FIELDS = {"source": "shapes", "num_examples": -1, "batch_size": 256}


def fields(kind: str) -> dict[str, object]:
    """Every config field of a `kind` evaluation, with its default (README "Evaluations")."""
    return {**COMMON_FIELDS, **KINDS[kind].FIELDS}
