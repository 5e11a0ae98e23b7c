"""Data sources named by spec strings such as `shapes` or `shapes:50000`.

A source is a Grain random-access data source (`len(src)`, `src[i]`) whose examples are dicts
with at least `image` (uint8 (H, W, 3)) and `caption` (str); it also has `captions(num)`, which
yields the first `num` captions cheaply (for training a tokenizer). Evaluation sources add
`label` (int32) to each example and `class_names` / `prompt_templates` attributes.
"""

from collections.abc import Iterator

from clipjax.data import shapes

_SHAPES_EVAL_SIZE = 2048


def _shapes(arg: str, split: str, seed: int) -> shapes.ShapesSource:
    """`shapes` or `shapes:N`: the built-in dataset, N examples (default 100k train, 2048 eval)."""
    if arg and not (arg.isdigit() and int(arg) > 0):
        raise ValueError(
            f"source 'shapes:{arg}': N must be a positive integer, e.g. 'shapes:50000'."
        )
    size = int(arg) if arg else {"train": 100_000, "eval": _SHAPES_EVAL_SIZE}[split]
    return shapes.ShapesSource(split, size=size, seed=seed)


_SCHEMES = {"shapes": _shapes}


def make_source(spec: str, split: str, *, seed: int = 0):
    """The random-access source named by `spec` ("scheme" or "scheme:argument") for `split`
    ("train" or "eval"). `seed` selects a different version of procedural datasets."""
    scheme, _, arg = spec.partition(":")
    if scheme not in _SCHEMES:
        raise ValueError(
            f"unknown data source {spec!r}; known schemes: {', '.join(sorted(_SCHEMES))} "
            "(e.g. 'shapes' or 'shapes:50000')."
        )
    return _SCHEMES[scheme](arg, split, seed)


def captions(spec: str, num: int = 20_000) -> Iterator[str]:
    """The first `num` training captions of `spec`, generated lazily (to train a tokenizer)."""
    return make_source(spec, "train").captions(num)
