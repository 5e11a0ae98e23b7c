"""Evaluation's inputs: the first records of a source, decoded, centre-cropped and resized, as
uint8 arrays, each process holding its rows of each chunk."""

import concurrent.futures
import os

import numpy as np
from absl import logging

from clipjax.data import image_ops, records, skipping, sources
from clipjax.data.tokenizer import Tokenizer


def _eval_example(source, index: int, image_size: int) -> dict | skipping.Skipped:
    """Record `index` of `source`, decoded, its image centre-cropped and resized (decoded no
    larger than that needs), or `skipping.Skipped`."""
    try:
        example = records.decode(source[index], encoded=True)
        example["image"] = image_ops.resize(example["image"], image_size)
    except records.BadRecord as e:
        return skipping.Skipped(e.key, e.reason)
    return example


def eval_arrays(
    spec: str,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    context_length: int,
    num_examples: int,
    max_skipped_fraction: float,
    seed: int = 0,
    share: tuple[int, int, int] | None = None,
) -> dict:
    """The first `num_examples` records (-1: all) of the "eval" split of `spec`, decoded; bad
    ones are skipped, leaving n examples.

    The records are read in chunks of `chunk` slots, record i in slot i; with `share` = (lo,
    hi, chunk) this process decodes only the slots [lo, hi) of each chunk (its rows of a
    sharded chunk, `sharding.process_rows`), and what the processes read is gathered, so the
    result is the same on every process but `image`. Default: one chunk of all records.

    Returns `{"image": uint8 (C · (hi - lo), image_size, image_size, 3), this process's slots
    of the C chunks (centre-cropped and resized; zeros for a bad record or past the end; uint8,
    as the model takes them: `models.two_tower.standardize`), "valid":
    bool (C · chunk,), the slots that hold a good record (n of them), "label": int32 (n,) (-1
    when the source has no labels), "text": int32 (m, context_length) (every caption of the n
    images, image-major), "text_image": int32 (m,) (the index of each caption's image among the
    n), "class_names": list[str], "prompt_templates": list[str] (each with `{}` for a class
    name; both [] when the source has none), "skipped": int}`. Raises ValueError when more
    than `max_skipped_fraction` of the records are bad. `seed` selects another stream of the
    procedural `shapes` dataset.
    """
    source = sources.make_source(spec, "eval", seed=seed)
    count = len(source) if num_examples == -1 else min(num_examples, len(source))
    lo, hi, chunk = (0, count, count) if share is None else share
    chunks = -(-count // chunk)
    slots = [c * chunk + r for c in range(chunks) for r in range(lo, hi)]
    records = [i for i in slots if i < count]  # the slots past the end come last
    # PIL decodes and resizes with the GIL released: threads keep the cores busy.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda i: _eval_example(source, i, image_size), records))
    images = np.zeros((len(slots), image_size, image_size, 3), np.uint8)
    mine = {}  # slot -> (label, captions) of this process's good records; and its bad ones
    bad = []
    for k, (i, result) in enumerate(zip(records, results, strict=True)):
        if isinstance(result, skipping.Skipped):
            bad.append((i, result.key, result.reason))
            continue
        images[k] = result["image"]
        captions = result.get("captions", [result["caption"]] if "caption" in result else [])
        mine[i] = (result.get("label", -1), captions)
    if share is not None:
        from clipjax import sharding  # here: Grain workers import this module, not jax

        gathered = sharding.gather_objects((mine, bad))
        mine = {i: meta for part, _ in gathered for i, meta in part.items()}
        bad = sorted(b for _, part in gathered for b in part)
    bad = [[key, reason] for _, key, reason in bad]
    for key, reason in bad[: skipping.NAMED_SKIPS]:
        logging.warning("Skipped a bad record of %s: %s (%s).", spec, key, reason)
    skipping.check_skipped(
        spec, count, len(bad), bad[: skipping.NAMED_SKIPS], count, max_skipped_fraction
    )
    if not mine:
        raise ValueError(f"source {spec!r}: no usable records among the first {count}.")
    valid = np.zeros(chunks * chunk, bool)
    valid[sorted(mine)] = True
    labels, captions = zip(*(mine[i] for i in sorted(mine)), strict=True)
    text_image = [i for i, caps in enumerate(captions) for _ in caps]
    return {
        "image": images,
        "valid": valid,
        "label": np.array(labels, np.int32),
        "text": tokenizer.encode([c for caps in captions for c in caps], context_length),
        "text_image": np.array(text_image, np.int32),
        "class_names": list(source.class_names or []),
        "prompt_templates": list(source.prompt_templates or []),
        "skipped": len(bad),
    }
