"""Grain input pipelines: the endless, resumable training stream and eager evaluation arrays.

Training order: source → this process's shard → shuffle (a new order every epoch) → repeat →
decode + views (augmented images, tokenized captions; seeded per element) → drop and count bad
records → batch → worker processes. Everything handed to Grain is a module-level class, so it
pickles into spawned workers; jax is imported only inside `train_dataset`, so workers do not pay
for importing it.
"""

import concurrent.futures
import ctypes
import dataclasses
import os
import signal
import sys

import grain
import numpy as np
from absl import logging

from clipjax.data import image_ops, records, sources, text_ops
from clipjax.data.tokenizer import Tokenizer

TEXT_VIEWS = ("plain", "mlm", "eda")


@dataclasses.dataclass(frozen=True)
class Views:
    """Which views of each example the training pipeline makes (an objective declares them).

    - `image_views` (1 or 2): independent augmentations of the image (`config.data.augment`,
      see `image_ops.Augment`), batch keys `image` and `image_2`, each float32 (b, size, size,
      3).
    - `text_views`, int32 (b, context_length) each: "plain" → `text`, the caption; "mlm" →
      `text_mlm`, the caption with BERT-style masking, plus `mlm_labels`, the original ids at
      the masked positions and 0 elsewhere (`text_ops.mlm_mask`); "eda" → `text_eda`, an
      EDA-augmented caption (`text_ops.eda`).
    """

    image_views: int = 1
    text_views: tuple[str, ...] = ("plain",)

    def __post_init__(self):
        if self.image_views not in (1, 2):
            raise ValueError(f"Views.image_views must be 1 or 2, not {self.image_views!r}.")
        views = tuple(self.text_views)
        object.__setattr__(self, "text_views", views)  # a list from a config is fine too
        if not views or len(set(views)) != len(views) or not set(views) <= set(TEXT_VIEWS):
            raise ValueError(
                f"Views.text_views {views!r} must be distinct kinds among {TEXT_VIEWS}."
            )


_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
# How many skipped records are named in logs and in the threshold error.
_NAMED_SKIPS = 5
# The skipped fraction is judged once this many records (or the whole source) were read.
_MIN_ATTEMPTED = 1000


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Stands in the stream for a record that `records.decode` rejected."""

    key: str
    reason: str


def _check_skipped(
    spec: str, attempted: int, skipped: int, named: list, size: int, max_fraction: float
) -> None:
    """ValueError if more than `max_fraction` of the records were bad, once `attempted` reaches
    min(1000, size). `named` holds (key, reason) of the first skipped records."""
    if attempted < min(_MIN_ATTEMPTED, size) or skipped <= max_fraction * attempted:
        return
    first = ", ".join(f"{key} ({reason})" for key, reason in named)
    first += ", ..." if skipped > len(named) else "."
    raise ValueError(
        f"source {spec!r}: skipped {skipped} of {attempted} records "
        f"({100 * skipped / attempted:.1f}%), more than config.data.max_skipped_fraction="
        f"{max_fraction}. First skipped: {first} Fix or remove those records, or raise "
        "config.data.max_skipped_fraction."
    )


@dataclasses.dataclass(frozen=True)
class _MakeViews(grain.transforms.RandomMap):
    """A raw record -> its views (see `Views`), or `_Skipped` if it does not decode.

    The element's rng draws the image views first, in order, then (for a record with several
    captions) the caption, then the text views in the order of `views.text_views`: the first
    image view is the same whichever other views are made.
    """

    views: Views
    tokenizer: Tokenizer
    image_size: int
    context_length: int
    augment: image_ops.Augment

    def _augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image_ops.normalize(self.augment(image, rng, self.image_size))

    def _encode(self, caption: str) -> np.ndarray:
        return self.tokenizer.encode([caption], self.context_length)[0]

    def random_map(self, record: dict, rng: np.random.Generator) -> dict | _Skipped:
        try:
            example = records.decode(record)
        except records.BadRecord as e:
            return _Skipped(e.key, e.reason)
        out = {"image": self._augment(example["image"], rng)}
        if self.views.image_views == 2:
            out["image_2"] = self._augment(example["image"], rng)
        if "caption" in example:
            caption = example["caption"]
        else:  # a multi-caption source: one of them, new each epoch
            caption = example["captions"][rng.integers(len(example["captions"]))]
        tok = self.tokenizer
        for kind in self.views.text_views:
            if kind == "plain":
                out["text"] = self._encode(caption)
            elif kind == "mlm":
                out["text_mlm"], out["mlm_labels"] = text_ops.mlm_mask(
                    self._encode(caption),
                    rng,
                    mask_id=tok.mask_id,
                    vocab_size=tok.vocab_size,
                    special_ids=(tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id),
                )
            else:
                eda = text_ops.eda(caption, rng, lexicon=text_ops.wordnet_lexicon())
                out["text_eda"] = self._encode(eda)
        return out


def _chunk(elements: list) -> dict:
    """`MapDataset.batch`'s batch_fn: the good elements stacked (`examples`), and the bad ones
    counted: `skipped` int32 (n_good,), the markers just before each good element; `trailing`,
    those after the last one; `bad`, every marker's (key, reason); `size`, all elements."""
    good, skipped, bad, run = [], [], [], 0
    for element in elements:
        if isinstance(element, _Skipped):
            bad.append((element.key, element.reason))
            run += 1
        else:
            good.append(element)
            skipped.append(run)
            run = 0
    examples = {key: np.stack([g[key] for g in good]) for key in good[0]} if good else {}
    return {
        "examples": examples,
        "skipped": np.array(skipped, np.int32),
        "trailing": run,
        "bad": bad,
        "size": len(elements),
    }


class _DropSkipped(grain.IterDataset):
    """Chunks (see `_chunk`) -> batches of exactly `batch_size` good examples, each with
    `skipped` int32 (batch_size,): the bad records dropped just before it. Logs the first bad
    records, and raises the `_check_skipped` ValueError when too many are bad.

    Work stays in whole chunks up to here (Grain's per-element overhead is a large part of a
    small image's cost); when no record is bad, a chunk is passed on as the batch. The
    iterator's state is its parent's state before the current chunk, the examples of that chunk
    already used, and the counts before it: restoring re-reads the chunk."""

    def __init__(self, parent, batch_size: int, spec: str, size: int, max_fraction: float):
        super().__init__(parent)
        self._args = (batch_size, spec, size, max_fraction)

    def __iter__(self) -> "_DropSkippedIterator":
        return _DropSkippedIterator(self._parent.__iter__(), *self._args)


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, spec: str, size: int, max_fraction: float):
        super().__init__(parent)
        self._batch_size, self._spec = batch_size, spec
        self._size, self._max_fraction = size, max_fraction
        # Counts over the chunks read; `pending`: bad records after the last good one.
        self._counts = {"attempted": 0, "skipped": 0, "named": [], "pending": 0}
        self._before = None  # (parent state, counts) before the current chunk
        self._examples, self._skipped, self._offset = {}, np.zeros(0, np.int32), 0

    def _read_chunk(self) -> None:
        counts = self._counts
        self._before = (self._parent.get_state(), {**counts, "named": list(counts["named"])})
        chunk = next(self._parent)
        counts["attempted"] += chunk["size"]
        counts["skipped"] += len(chunk["bad"])
        for key, reason in chunk["bad"]:
            if len(counts["named"]) < _NAMED_SKIPS and key not in (k for k, _ in counts["named"]):
                counts["named"].append([key, reason])
                logging.warning("Skipped a bad record of %s: %s (%s).", self._spec, key, reason)
        skipped = chunk["skipped"]
        if len(skipped):
            skipped[0] += counts["pending"]
            counts["pending"] = chunk["trailing"]
        else:
            counts["pending"] += chunk["trailing"]
        _check_skipped(
            self._spec,
            counts["attempted"],
            counts["skipped"],
            counts["named"],
            self._size,
            self._max_fraction,
        )
        self._examples, self._skipped, self._offset = chunk["examples"], skipped, 0

    def __next__(self) -> dict:
        parts, need = [], self._batch_size  # (examples, skipped, start, stop)
        while need:
            if self._offset == len(self._skipped):
                self._read_chunk()
                continue
            take = min(need, len(self._skipped) - self._offset)
            parts.append((self._examples, self._skipped, self._offset, self._offset + take))
            self._offset += take
            need -= take
        if len(parts) == 1 and parts[0][2] == 0 and parts[0][3] == len(parts[0][1]):
            return {**parts[0][0], "skipped": parts[0][1]}  # a whole chunk: no copies
        batch = {
            key: np.concatenate([examples[key][a:b] for examples, _, a, b in parts])
            for key in parts[0][0]
        }
        batch["skipped"] = np.concatenate([skipped[a:b] for _, skipped, a, b in parts])
        return batch

    def get_state(self) -> dict:
        if self._before is None:  # no chunk read yet
            return {"parent": self._parent.get_state(), "offset": 0, **self._counts}
        parent, counts = self._before
        return {"parent": parent, "offset": self._offset, **counts}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {key: state[key] for key in ("attempted", "skipped", "pending")}
        self._counts["named"] = [list(n) for n in state["named"]]
        self._before, self._examples, self._skipped = None, {}, np.zeros(0, np.int32)
        self._offset = 0
        if state["offset"]:
            self._read_chunk()
            self._offset = state["offset"]


def train_dataset(
    data_config,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    context_length: int,
    global_batch_size: int,
    seed: int,
    views: Views = Views(),
) -> grain.IterDataset:
    """This process's endless stream of training batches.

    `data_config` is `config.data` (`train` source spec, `num_workers`, `augment`,
    `max_skipped_fraction`). Each batch holds the `views` of `b = global_batch_size //
    jax.process_count()` examples; by default `{"image": float32 (b, image_size, image_size, 3),
    "text": int32 (b, context_length)}`, plus always `"skipped"`: int32 (b,), the bad records
    dropped just before each example (its sum over batches counts every bad record once).
    Iterating raises ValueError once more than `max_skipped_fraction` of the records read are
    bad (judged per worker, after each batch-sized chunk of records, once min(1000,
    len(source)) were read).
    The iterator of the returned dataset has `get_state` / `set_state` (use
    `grain.checkpoint.CheckpointSave/Restore`): restoring resumes on exactly the batches that
    followed the save.
    """
    import jax  # Here, not at the top: Grain workers import this module.

    if "mlm" in views.text_views and tokenizer.mask_id is None:
        raise ValueError(
            "DeCLIP's masked-language-model view needs a '[MASK]' piece in the tokenizer, and "
            "the sentencepiece model at config.data.tokenizer.path has none. Train it with "
            "'[MASK]' as a user-defined symbol, or set config.data.tokenizer.path to '' to "
            "train one (clipjax's tokenizers reserve '[MASK]')."
        )

    process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(
            f"batch size {global_batch_size} does not split evenly over {process_count} processes."
        )
    batch_size = global_batch_size // process_count
    # One seed per process, so that processes augment their elements independently.
    process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    max_fraction = getattr(data_config, "max_skipped_fraction", 0.01)

    source = sources.make_source(data_config.train, "train")
    ds = grain.MapDataset.source(source)
    ds = ds[process_index::process_count]
    ds = ds.seed(process_seed).shuffle().repeat()
    augment = image_ops.Augment(**data_config.augment)
    ds = ds.random_map(_MakeViews(views, tokenizer, image_size, context_length, augment))
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_chunk)
    # Elements are whole chunks here: a small buffer bounds host memory. Two threads overlap
    # the decoding and PIL work, which releases the GIL; more only contend for it.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    # Bad records drop out of the chunks, which are regrouped into full batches.
    ds = _DropSkipped(ds, batch_size, data_config.train, len(source), max_fraction)
    if data_config.num_workers > 0:
        options = grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        ds = ds.mp_prefetch(options, worker_init_fn=_init_worker)
    return ds


def _init_worker(index: int, count: int) -> None:
    """In each Grain worker: leave SIGTERM and SIGINT to the trainer, which stops the input
    after saving; and on Linux, die with the trainer even when it is killed with SIGKILL."""
    del index, count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _eval_example(source, index: int, image_size: int) -> dict | _Skipped:
    """Record `index` of `source`, decoded, its image resized (or `_Skipped`)."""
    try:
        example = records.decode(source[index])
    except records.BadRecord as e:
        return _Skipped(e.key, e.reason)
    example["image"] = image_ops.resize(example["image"], image_size)
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
) -> dict:
    """The first `num_examples` records (-1: all) of the "eval" split of `spec`, decoded; bad
    ones are skipped, leaving n examples.

    Returns `{"image": uint8 (n, image_size, image_size, 3) (centre-cropped and resized; uint8
    is a quarter of float32's memory: normalise per batch with `image_ops.normalize`), "label":
    int32 (n,) (-1 when the source has no labels), "text": int32 (m, context_length) (every
    caption of the n images, image-major), "text_image": int32 (m,) (the index of each
    caption's image), "class_names": list[str], "prompt_templates": list[str] (each with `{}`
    for a class name; both [] when the source has none), "skipped": int}`. Raises ValueError
    when more than `max_skipped_fraction` of the records are bad. `seed` selects another
    stream of the procedural `shapes` dataset.
    """
    source = sources.make_source(spec, "eval", seed=seed)
    count = len(source) if num_examples == -1 else min(num_examples, len(source))
    # PIL decodes and resizes with the GIL released: threads keep the cores busy.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda i: _eval_example(source, i, image_size), range(count)))
    examples = [r for r in results if not isinstance(r, _Skipped)]
    bad = [[r.key, r.reason] for r in results if isinstance(r, _Skipped)]
    for key, reason in bad[:_NAMED_SKIPS]:
        logging.warning("Skipped a bad record of %s: %s (%s).", spec, key, reason)
    _check_skipped(spec, count, len(bad), bad[:_NAMED_SKIPS], count, max_skipped_fraction)
    if not examples:
        raise ValueError(f"source {spec!r}: no usable records among the first {count}.")
    captions = [e.get("captions", [e["caption"]] if "caption" in e else []) for e in examples]
    text_image = [i for i, caps in enumerate(captions) for _ in caps]
    return {
        "image": np.stack([e["image"] for e in examples]),
        "label": np.array([e.get("label", -1) for e in examples], np.int32),
        "text": tokenizer.encode([c for caps in captions for c in caps], context_length),
        "text_image": np.array(text_image, np.int32),
        "class_names": list(source.class_names or []),
        "prompt_templates": list(source.prompt_templates or []),
        "skipped": len(bad),
    }
