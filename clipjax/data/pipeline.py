"""The training input: an endless, resumable Grain stream of batches (evaluation's arrays are in
`eval_input`, the handling of bad records in `skipping`).

Training order: source → shuffle (a new order every epoch) → repeat → decode + views (augmented
uint8 images, each decoded no larger than its crop needs; tokenized captions; seeded by the
element's place in that one global order) → this process's rows of each global batch → drop and
count bad records → batch → worker processes. So global batch k holds the same examples, with
the same augmentations, whatever the number of processes reading it. `webdataset:` shards are
streamed instead: each process and worker reads its own shards (`webdataset.ShardStream`), and
its batches are its own. Everything handed to Grain is a module-level class, so it pickles into
spawned workers; jax is imported only inside `train_dataset`, so workers do not pay for
importing it.
"""

import ctypes
import dataclasses
import signal
import sys

import grain
import numpy as np
from absl import logging

from clipjax.data import image_ops, records, skipping, sources, text_ops, webdataset
from clipjax.data.tokenizer import Tokenizer
from clipjax.data.views import Views

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclasses.dataclass(frozen=True)
class _MakeViews(grain.transforms.RandomMap):
    """A raw record -> its views (an objective's `Views`, as plain fields so workers need not
    import the objectives), or `skipping.Skipped` if it does not decode.

    The element's rng draws the image views first, in order, then (for a record with several
    captions) the caption, then the text views in the order of `text_views`: the first image
    view is the same whichever other views are made.
    """

    image_views: int
    text_views: tuple[str, ...]
    tokenizer: Tokenizer
    image_size: int
    context_length: int
    augment: image_ops.Augment
    view_augments: tuple[image_ops.Augment | None, ...] = ()  # per view; None: `augment`

    def _augment(self, image, rng: np.random.Generator, view: int) -> np.ndarray:
        own = self.view_augments[view] if self.view_augments else None
        return (own or self.augment)(image, rng, self.image_size)

    def _encode(self, caption: str) -> np.ndarray:
        return self.tokenizer.encode([caption], self.context_length)[0]

    def random_map(self, record: dict, rng: np.random.Generator) -> dict | skipping.Skipped:
        try:
            # Pixels are decoded by the crops, each no larger than it needs.
            example = records.decode(record, encoded=True)
            keys = ("image", "image_2", "image_3")[: self.image_views]
            out = {key: self._augment(example["image"], rng, v) for v, key in enumerate(keys)}
        except records.BadRecord as e:
            return skipping.Skipped(e.key, e.reason)
        if "caption" in example:
            caption = example["caption"]
        else:  # a multi-caption source: one of them, new each epoch
            caption = example["captions"][rng.integers(len(example["captions"]))]
        tok = self.tokenizer
        for kind in self.text_views:
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


class _ProcessRows(grain.MapDataset):
    """Element j of this process's stream: row `lo + j % b` of global batch `start + j // b`
    of the global stream `parent`, where this process's devices hold rows [lo, hi) of every
    global batch of `global_batch` elements and b = hi - lo."""

    def __init__(self, parent, global_batch: int, rows: tuple[int, int], start: int):
        super().__init__(parent)
        self._global, (self._lo, hi), self._start = global_batch, rows, start
        self._rows = hi - self._lo

    def __len__(self) -> int:
        return len(self._parent)  # endless: the parent repeats

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._rows)
        return self._parent[(self._start + batch) * self._global + self._lo + row]

    def __str__(self) -> str:
        return f"_ProcessRows(rows={self._lo}:{self._lo + self._rows} of {self._global})"


class _Positioned(grain.IterDataset):
    """The top of the training stream: its state records the global batches handed out and
    the bad records this process skipped, around the inner stream's own state, so that
    `checkpoint.Checkpointer` can map a position saved by another number of processes
    (`start_at`); and the source's fingerprint (`sources.fingerprint`), so that it can refuse
    a position into other data. `make(k)` is None for k > 0 when the stream cannot start at
    global batch k (a stream of shards)."""

    def __init__(self, make, source: dict, spec: str):
        super().__init__()
        self._make = make  # start batch -> the inner IterDataset from there
        self._source, self._spec = source, spec

    def __iter__(self) -> "_PositionedIterator":
        return _PositionedIterator(self._make, self._source, self._spec)


class _PositionedIterator(grain.DatasetIterator):
    def __init__(self, make, source: dict, spec: str):
        super().__init__()
        self._make, self._source, self._spec = make, source, spec
        self._inner = iter(make(0))
        self._batches, self._skipped = 0, 0

    def __next__(self) -> dict:
        # Out of the workers' shared memory at once: the block is unlinked when its array is
        # freed, and a batch still held at exit (aliased by a CPU device array, say) would be
        # left for the resource tracker, which warns of each. One host copy per batch.
        batch = {
            key: value if type(value) is np.ndarray else np.array(value)
            for key, value in next(self._inner).items()
        }
        self._batches += 1
        self._skipped += int(batch["skipped"].sum())
        return batch

    def get_state(self) -> dict:
        state = {"batches": self._batches, "skipped": self._skipped, "source": self._source}
        return {**state, "stream": self._inner.get_state()}

    def set_state(self, state: dict) -> None:
        self._inner.set_state(state["stream"])
        self._batches, self._skipped = state["batches"], state["skipped"]

    def start_at(self, batches: int) -> None:
        """Continue from global batch `batches`, as a fresh stream: right for a position saved
        by any number of processes when no record had been skipped before it. ConfigError
        where the stream cannot start there."""
        inner = self._make(batches)
        if inner is None:
            from clipjax.errors import ConfigError

            raise ConfigError(
                f"config.data.train={self._spec!r} is streamed by each process from its own "
                "shards, so its position cannot move to another number of processes; resume "
                "with the number that saved it, or start a new --workdir "
                "(--config.init_from=WORKDIR starts from its weights)."
            )
        self.close()
        self._inner, self._batches, self._skipped = iter(inner), batches, 0

    def close(self) -> None:
        if hasattr(self._inner, "close"):
            self._inner.close()


def train_dataset(
    data_config,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    context_length: int,
    global_batch_size: int,
    seed: int,
    views: Views | None = None,
    rows: tuple[int, int] | None = None,
) -> grain.IterDataset:
    """This process's endless stream of training batches: rows `rows` = [lo, hi) (default:
    all) of every global batch of `global_batch_size` examples, drawn from one global order
    (see the module docstring; `sharding.process_rows` gives a process's rows).

    `data_config` is `config.data` (`train` source spec, `num_workers`, `augment`,
    `max_skipped_fraction`). Each batch holds the `views` (`data.views.Views`, declared by
    the objective; None: `Views()`) of b = hi - lo examples; by default
    `{"image": uint8 (b, image_size, image_size, 3), "text": int32 (b, context_length)}`,
    plus always `"skipped"`: int32 (b,), the bad records dropped just before each example (its
    sum over batches counts every bad record once). A bad record's place is taken by the next
    good one of this process's rows, so batches stay equal across process counts only while no
    record is bad. Iterating raises ValueError once more than `max_skipped_fraction` of the
    records read are bad (judged per worker, after each batch-sized chunk of records, once
    min(1000, len(source)) were read).
    The iterator of the returned dataset has `get_state` / `set_state` (use
    `grain.checkpoint.CheckpointSave/Restore`): restoring resumes on exactly the batches that
    followed the save; and `start_at(k)`, which continues from global batch k.
    """
    views = Views() if views is None else views
    image_views, text_views = views.image_views, views.text_views
    if "mlm" in text_views and tokenizer.mask_id is None:
        raise ValueError(
            "DeCLIP's masked-language-model view needs a '[MASK]' piece in the tokenizer, and "
            "the sentencepiece model at config.data.tokenizer.path has none. Train it with "
            "'[MASK]' as a user-defined symbol, or set config.data.tokenizer.path to '' to "
            "train one (clipjax's tokenizers reserve '[MASK]')."
        )
    rows = (0, global_batch_size) if rows is None else rows
    batch_size = rows[1] - rows[0]
    # The stream's seed: derived as when each process drew its own stream (process 0's), so
    # one-process runs kept their batches when the order became global.
    data_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
    max_fraction = getattr(data_config, "max_skipped_fraction", 0.01)
    source = sources.make_source(data_config.train, "train")
    if isinstance(source, sources.Mixture):
        logging.info("Training on a mixture, by share of the examples: %s", repr(source)[8:-1])
    augment = image_ops.Augment(**data_config.augment)
    view_augments = tuple(a and image_ops.Augment(**a) for a in views.image_augments)
    make_views = _MakeViews(
        image_views, text_views, tokenizer, image_size, context_length, augment, view_augments
    )
    fingerprint = sources.fingerprint(source)
    if streamed := isinstance(source, webdataset.WebDatasetSource):
        import jax  # here: Grain workers import this module, not jax

        process, processes = jax.process_index(), jax.process_count()
        workers = max(1, data_config.num_workers)
        # Each process's workers read their own shards (`webdataset.ShardStream`).
        fingerprint["readers"] = readers = processes * workers
        if len(source.shards) < readers:
            raise ValueError(
                f"source {data_config.train!r}: {len(source.shards)} shards cannot be split "
                f"over {readers} readers ({processes} processes × {workers} workers, "
                "config.data.num_workers); lower config.data.num_workers or write more shards."
            )

    def make(start: int) -> grain.IterDataset | None:
        if streamed:
            if start:
                return None
            ds = webdataset.ShardStream(source, data_seed, process, processes)
            ds = ds.random_map(make_views, seed=data_seed)
            ds = ds.batch(batch_size, drop_remainder=True, batch_fn=skipping.chunk)
            size = skipping.MIN_ATTEMPTED  # not known before the shards are read
        else:
            ds = shuffled_records(source, data_seed).random_map(make_views)
            ds = _ProcessRows(ds, global_batch_size, rows, start)
            ds = ds.batch(batch_size, drop_remainder=True, batch_fn=skipping.chunk)
            # Elements are whole chunks here: a small buffer bounds host memory. Two threads
            # overlap the decoding and PIL work, which releases the GIL; more only contend.
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
            size = len(source)
        # Bad records drop out of the chunks, which are regrouped into full batches.
        ds = skipping.DropSkipped(ds, batch_size, data_config.train, size, max_fraction)
        if data_config.num_workers > 0:
            options = grain.MultiprocessingOptions(num_workers=data_config.num_workers)
            ds = ds.mp_prefetch(options, worker_init_fn=_init_worker)
        return ds

    return _Positioned(make, fingerprint, data_config.train)


def shuffled_records(source, seed: int) -> grain.MapDataset:
    """The endless global order of `source`'s raw records: shuffled anew each epoch from
    `seed`. A `sources.Mixture` has each part shuffled and repeated on its own, then
    interleaved in proportion to the weights (element i is the same whatever came before)."""
    if not isinstance(source, sources.Mixture):
        return grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    parts = [
        grain.MapDataset.source(part)
        .seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        .shuffle()
        .repeat()
        for index, part in enumerate(source.parts)
    ]
    return grain.MapDataset.mix(parts, source.weights)


def _init_worker(index: int, count: int) -> None:
    """In each Grain worker: leave SIGTERM and SIGINT to the trainer, which stops the input
    after saving; and on Linux, die with the trainer even when it is killed with SIGKILL."""
    del index, count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
