"""Grain input pipelines: the endless, resumable training stream and eager evaluation arrays.

Training order: source → this process's shard → shuffle (a new order every epoch) → repeat →
augment (RandomResizedCrop + flip, seeded per element) → tokenize → batch → worker processes.
Everything handed to Grain is a module-level class, so it pickles into spawned workers; jax is
imported only inside `train_dataset`, so workers do not pay for importing it.
"""

import dataclasses

import grain
import numpy as np

from clipjax.data import image_ops, sources
from clipjax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class _AugmentImage(grain.transforms.RandomMap):
    """`image` uint8 (H, W, 3) -> float32 (image_size, image_size, 3), cropped, flipped and
    normalised; keeps only `image` and `caption`."""

    image_size: int
    crop_scale: tuple[float, float]

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image = image_ops.random_resized_crop(
            example["image"], rng, self.image_size, scale=self.crop_scale
        )
        image = image_ops.random_flip(image, rng)
        return {"image": image_ops.normalize(image), "caption": example["caption"]}


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
    """`caption` str -> `text` int32 (context_length,)."""

    tokenizer: Tokenizer
    context_length: int

    def map(self, example: dict) -> dict:
        text = self.tokenizer.encode([example["caption"]], self.context_length)[0]
        return {"image": example["image"], "text": text}


def train_dataset(
    data_config,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    context_length: int,
    global_batch_size: int,
    seed: int,
) -> grain.IterDataset:
    """This process's endless stream of training batches.

    `data_config` is `config.data` (`train` source spec, `num_workers`, `crop_scale`). Each batch
    is `{"image": float32 (b, image_size, image_size, 3), "text": int32 (b, context_length)}`
    with `b = global_batch_size // jax.process_count()`. The iterator of the returned dataset
    has `get_state` / `set_state` (use `grain.checkpoint.CheckpointSave/Restore`): restoring
    resumes on exactly the batches that followed the save.
    """
    import jax  # Here, not at the top: Grain workers import this module.

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
    ds = ds.random_map(_AugmentImage(image_size, crop_scale))
    ds = ds.map(_Tokenize(tokenizer, context_length))
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
