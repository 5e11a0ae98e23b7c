"""Every config field the trainer reads, with its default, and the checks run before compiling.

Config files in `configs/` start from `base_config()` and change values; a field that is not
here is a typo, and `validate` names it before anything runs.
"""

import difflib
import math
import os
import tempfile

import ml_collections

from clipjax.data import sources
from clipjax.models.resnet import resnet_size
from clipjax.models.vit import vit_size


class ConfigError(ValueError):
    """A bad config value; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """CLIP ViT-B/32 at open_clip's ViT-B-32 shapes, on the built-in dataset."""
    c = ml_collections.ConfigDict()
    c.objective = "clip"
    c.seed = 0

    c.batch_size = 32_768  # global, over all devices
    c.total_steps = 100_000
    c.log_every = 100
    c.eval_every = 2_000
    c.ckpt_every = 2_000
    c.keep_ckpts = 3

    # Mesh axis sizes; -1 takes every device left. Pure data parallel by default.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 512
    c.model.projection = "linear"  # tower → joint space; "mi_block" for CLIP-Lite's critic
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on TPU/GPU
    c.model.image = ml_collections.ConfigDict()
    c.model.image.variant = "B/32"  # ViT "<size>/<patch>", or ResNet "RN50", "RN101", ...
    c.model.image.size = 224
    c.model.image.depth = -1  # ViT depth; -1: the variant's own
    c.model.image.width = -1  # ResNet stem width; -1: the variant's own
    c.model.text = ml_collections.ConfigDict()
    c.model.text.width = 512
    c.model.text.depth = 12
    c.model.text.heads = 8
    c.model.text.context_length = 77
    c.model.text.vocab_size = 49_408

    c.data = ml_collections.ConfigDict()
    c.data.train = "shapes"  # source spec string
    c.data.num_workers = 8  # Grain decode processes; 0 decodes in the training process
    c.data.crop_scale = (0.9, 1.0)  # RandomResizedCrop area range (open_clip's default)
    c.data.tokenizer = ml_collections.ConfigDict()
    c.data.tokenizer.path = ""  # a sentencepiece .model; "" trains one into the workdir
    c.data.tokenizer.vocab_size = 512  # only used when training a tokenizer

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # or "sgd_lookahead" (SGD + momentum inside Lookahead)
    c.optim.lr = 5e-4  # peak, after linear warm-up from 0; cosine decay to 0 at total_steps
    c.optim.warmup_steps = 2_000
    c.optim.warmup_from = 0.0  # learning rate at step 0
    c.optim.weight_decay = 0.2  # not on biases, norms or the logit scale
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.grad_clip = 1.0  # global-norm clip; 0 disables
    c.optim.momentum = 0.9  # sgd_lookahead only
    c.optim.lookahead_steps = 5  # sgd_lookahead: sync period k
    c.optim.lookahead_alpha = 0.5  # sgd_lookahead: slow step size

    # Objective-specific fields, read only when config.objective names them.
    c.siglip = ml_collections.ConfigDict()
    c.siglip.chunked = True  # ring over devices: at most (B/k)² logits per device
    c.siglip.scale_init = math.log(10.0)  # t' with t = exp(t')
    c.siglip.bias_init = -10.0
    c.declip = ml_collections.ConfigDict()
    c.declip.mvs_weight = 0.4  # official code: 0.4 / 0.2 / 0.2 / 0.2
    c.declip.iss_weight = 0.2
    c.declip.tss_weight = 0.2
    c.declip.nns_weight = 0.2
    c.declip.queue_size = 65_536  # one global FIFO of text embeddings, sharded over devices
    c.declip.sync_bn = False  # SimSiam BatchNorm statistics: per device (official) or synced
    c.declip.image_augment = "mocov2"  # the two image views; "clip" = crop + flip only
    c.cliplite = ml_collections.ConfigDict()
    c.cliplite.prior_weight = 0.1  # total = (1 - w) · cross + w · prior
    c.cliplite.image_prior = True
    c.cliplite.text_prior = False
    c.cliplite.image_view_weight = 0.0  # > 0 adds JSD between two image views, own critic
    c.cliplite.caption_view_weight = 0.0  # > 0 adds JSD between caption and its EDA rewrite

    c.eval = ml_collections.ConfigDict()
    c.eval.source = "shapes"  # built-in held-out split, with class labels and captions
    c.eval.num_examples = 2_048
    c.eval.batch_size = 256
    return c


def apply_local(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:local` sizes shared by every config: a tiny ViT and text tower, 32-px images,
    batch 128 and 600 steps, so a laptop CPU trains one in minutes and methods compare at
    equal steps."""
    c.batch_size = 128
    c.total_steps = 600
    c.log_every = 25
    c.eval_every = 200
    c.ckpt_every = 200

    c.model.embed_dim = 64
    c.model.image.variant = "Ti/8"
    c.model.image.size = 32
    c.model.image.depth = 4
    c.model.text.width = 128
    c.model.text.depth = 2
    c.model.text.heads = 4
    c.model.text.context_length = 24
    c.model.text.vocab_size = 512

    c.data.num_workers = 1
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.eval.num_examples = 512
    return c


def _fields(config, prefix="config") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_fields(value, name))
        else:
            out[name] = value
    return out


def unknown_field_error(name: str) -> ConfigError | None:
    """A ConfigError if `name` ("config.optim.lr") is not a config field, else None."""
    known = _fields(base_config())
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return ConfigError(f"{name} is not a clipjax config field.{hint}")


def _check_known_fields(config) -> None:
    for name in _fields(config):
        if error := unknown_field_error(name):
            raise error


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir} is not writable ({e.strerror}); pass a directory you can "
            "write to."
        ) from None


def validate(config, workdir: str, data_parallel: int) -> None:
    """Raise ConfigError naming the field and the fix; run before anything compiles."""
    _check_known_fields(config)
    if config.batch_size % data_parallel:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not split over the {data_parallel} "
            f"data-parallel devices; use a multiple of {data_parallel}."
        )
    image = config.model.image
    try:
        if image.variant.startswith("RN"):
            resnet_size(image.variant)
            patch = 32  # the ResNet downsamples by 32
        else:
            patch = vit_size(image.variant)[-1]
    except ValueError as e:
        raise ConfigError(f"config.model.image.variant: {e}") from None
    if image.size % patch:
        kind = "patch size" if not image.variant.startswith("RN") else "downsampling factor"
        raise ConfigError(
            f"config.model.image.size={image.size} is not divisible by the {kind} {patch} of "
            f"variant {image.variant!r}; use a multiple of {patch}."
        )
    for field, spec, split in (
        ("config.data.train", config.data.train, "train"),
        ("config.eval.source", config.eval.source, "eval"),
    ):
        try:
            sources.make_source(spec, split)
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
    path = config.data.tokenizer.path
    if path and not os.path.exists(path):
        raise ConfigError(
            f"config.data.tokenizer.path: no sentencepiece model at {path!r}. Point it at an "
            "existing .model file, or set it to '' to train one from the training captions."
        )
    _check_workdir(workdir)
