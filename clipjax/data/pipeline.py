"""Grain input pipelines: the endless, resumable training stream and eager evaluation arrays.

Training order: source → this process's shard → shuffle (a new order every epoch) → repeat →
views (augmented images, tokenized captions; seeded per element) → batch → worker processes.
Everything handed to Grain is a module-level class, so it pickles into spawned workers; jax is
imported only inside `train_dataset`, so workers do not pay for importing it.
"""

import dataclasses

import grain
import numpy as np

from clipjax.data import image_ops, sources, text_ops
from clipjax.data.tokenizer import Tokenizer

IMAGE_AUGMENTS = ("clip", "mocov2")
TEXT_VIEWS = ("plain", "mlm", "eda")


@dataclasses.dataclass(frozen=True)
class Views:
    """Which views of each example the training pipeline makes (an objective declares them).

    - `image_views` (1 or 2): independent augmentations of the image, batch keys `image` and
      `image_2`, each float32 (b, size, size, 3).
    - `image_augment`: "clip" (RandomResizedCrop(`config.data.crop_scale`) + flip) or "mocov2"
      (see `image_ops.mocov2_augment`).
    - `text_views`, int32 (b, context_length) each: "plain" → `text`, the caption; "mlm" →
      `text_mlm`, the caption with BERT-style masking, plus `mlm_labels`, the original ids at
      the masked positions and 0 elsewhere (`text_ops.mlm_mask`); "eda" → `text_eda`, an
      EDA-augmented caption (`text_ops.eda`).
    """

    image_views: int = 1
    image_augment: str = "clip"
    text_views: tuple[str, ...] = ("plain",)

    def __post_init__(self):
        if self.image_views not in (1, 2):
            raise ValueError(f"Views.image_views must be 1 or 2, not {self.image_views!r}.")
        if self.image_augment not in IMAGE_AUGMENTS:
            raise ValueError(
                f"Views.image_augment {self.image_augment!r} is not one of {IMAGE_AUGMENTS}."
            )
        views = tuple(self.text_views)
        object.__setattr__(self, "text_views", views)  # a list from a config is fine too
        if not views or len(set(views)) != len(views) or not set(views) <= set(TEXT_VIEWS):
            raise ValueError(
                f"Views.text_views {views!r} must be distinct kinds among {TEXT_VIEWS}."
            )


@dataclasses.dataclass(frozen=True)
class _MakeViews(grain.transforms.RandomMap):
    """An example (`image` uint8 (H, W, 3), `caption` str) -> its views (see `Views`).

    The element's rng draws the image views first, in order, then the text views in the order
    of `views.text_views`: the first image view is the same whichever other views are made.
    """

    views: Views
    tokenizer: Tokenizer
    image_size: int
    context_length: int
    crop_scale: tuple[float, float]

    def _augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.views.image_augment == "mocov2":
            image = image_ops.mocov2_augment(image, rng, self.image_size)
        else:
            image = image_ops.clip_augment(image, rng, self.image_size, self.crop_scale)
        return image_ops.normalize(image)

    def _encode(self, caption: str) -> np.ndarray:
        return self.tokenizer.encode([caption], self.context_length)[0]

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        out = {"image": self._augment(example["image"], rng)}
        if self.views.image_views == 2:
            out["image_2"] = self._augment(example["image"], rng)
        caption, tok = example["caption"], self.tokenizer
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

    `data_config` is `config.data` (`train` source spec, `num_workers`, `crop_scale`). Each batch
    holds the `views` of `b = global_batch_size // jax.process_count()` examples; by default
    `{"image": float32 (b, image_size, image_size, 3), "text": int32 (b, context_length)}`.
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
    # One seed per process, so that processes augment their elements independently.
    process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])

    ds = grain.MapDataset.source(sources.make_source(data_config.train, "train"))
    ds = ds[process_index::process_count]
    ds = ds.seed(process_seed).shuffle().repeat()
    crop_scale = tuple(float(s) for s in data_config.crop_scale)
    ds = ds.random_map(_MakeViews(views, tokenizer, image_size, context_length, crop_scale))
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    # Elements are whole batches here: a small buffer bounds host memory. Two threads overlap
    # the numpy/PIL work that releases the GIL; more only contend for it.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if data_config.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    return ds


def eval_arrays(
    spec: str, *, tokenizer: Tokenizer, image_size: int, context_length: int, num_examples: int
) -> dict:
    """The first `n = min(num_examples, len(source))` examples of the `eval` split of `spec`.

    Returns `{"image": float32 (n, image_size, image_size, 3) (resized, normalised), "text":
    int32 (n, context_length) (each example's caption), "label": int32 (n,), "class_names":
    list[str], "prompt_templates": list[str]}` (templates contain `{}` for a class name).
    """
    source = sources.make_source(spec, "eval")
    examples = [source[i] for i in range(min(num_examples, len(source)))]
    images = [image_ops.normalize(image_ops.resize(e["image"], image_size)) for e in examples]
    return {
        "image": np.stack(images),
        "text": tokenizer.encode([e["caption"] for e in examples], context_length),
        "label": np.array([e["label"] for e in examples], np.int32),
        "class_names": list(source.class_names),
        "prompt_templates": list(source.prompt_templates),
    }
