"""The config's sections: the run's fields, the model, data, optimizer and evaluations, and the
`:local` sizes. Each method's own section is in `config.methods`."""

import ml_collections

from clipjax import evaluate
from clipjax.config.methods import methods
from clipjax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    """CLIP ViT-B/32 at open_clip's ViT-B-32 shapes, on the built-in dataset: the run's fields,
    then one section each for the model, data, optimizer, objectives and evaluations."""
    c = ml_collections.ConfigDict()
    c.objective = "clip"
    c.seed = 0

    c.batch_size = 32_768  # global, over all devices
    # Contrastive gradient accumulation (GradCache): each step embeds the batch in this many
    # micro-batches, takes the loss over the whole batch (every negative), and pulls its
    # gradient back one micro-batch at a time. CLIP and SigLIP with ViT towers; it must divide
    # each device's share of the batch.
    c.accum_steps = 1
    c.total_steps = 100_000
    c.log_every = 100
    c.eval_every = 2_000
    c.ckpt_every = 2_000
    c.ckpt_every_secs = 0.0  # > 0: also save when this many seconds passed since the last save
    c.keep_ckpts = 3
    # Steps whose loss or gradients are not finite are skipped; this many in a row stop the run.
    c.max_nonfinite_steps = 20
    # A clipjax workdir, export or open_clip folder whose weights start a new run (parameters
    # and BatchNorm statistics; objective heads it lacks start fresh; a fresh optimizer).
    c.init_from = ""

    # Mesh axis sizes; -1 takes every device left. Pure data parallel by default.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})

    c.model = _model()
    c.data = _data()
    c.optim = _optim()
    c.update(methods())  # one section per objective: c.clip, c.declip, ...
    c.evals = _evals()
    return c


def _model() -> ml_collections.ConfigDict:
    """The two towers: ViT-B/32 and open_clip's text transformer."""
    model = ml_collections.ConfigDict()
    model.embed_dim = 512
    model.projection = "linear"  # tower → joint space; "mi_block" for CLIP-Lite's critic
    # Compute dtype of the towers' products (models/precision.py: float32 parameters and
    # accumulation, bfloat16 operands); "float32" computes everything in float32.
    model.dtype = "bfloat16"
    model.quick_gelu = False  # OpenAI's x·σ(1.702x) GELU, which its released weights need
    model.scan_layers = False  # nn.scan over transformer blocks: compile time flat in depth
    model.remat = "none"  # what the blocks' backward keeps: "none" (all), "dots", "full"
    # The transformers' attention kernel (jax.nn.dot_product_attention's implementation):
    # "auto" takes cuDNN's fused flash attention on a GPU with 16-bit operands, XLA elsewhere;
    # "xla" or "cudnn" forces one ("cudnn" needs a GPU and a 16-bit model.dtype).
    model.attention = "auto"
    model.image = ml_collections.ConfigDict()
    model.image.variant = "B/32"  # ViT "<size>/<patch>", or ResNet "RN50", "RN101", ...
    model.image.size = 224
    model.image.depth = -1  # ViT depth; -1: the variant's own
    model.image.width = -1  # ResNet stem width; -1: the variant's own
    model.image.output_dim = -1  # ResNet attention-pool output width; -1: the variant's own
    # LiT: lock the tower and its projection (optim.frozen's shorthand); BatchNorm statistics
    # stay as loaded. Usually with init_from.
    model.image.locked = False
    model.image.patch_dropout = 0.0  # ViT: fraction of patch tokens dropped in training (FLIP)
    model.text = ml_collections.ConfigDict()
    model.text.width = 512
    model.text.depth = 12
    model.text.heads = 8
    model.text.context_length = 77
    model.text.vocab_size = 49_408
    model.text.locked = False  # LiT the other way round: the text tower and its projection
    return model


def _data() -> ml_collections.ConfigDict:
    """The training input: source, decoding, augmentation, tokenizer."""
    data = ml_collections.ConfigDict()
    data.train = "shapes"  # source spec string
    data.num_workers = 8  # Grain decode processes; 0 decodes in the training process
    data.device_prefetch = 2  # batches placed on the devices ahead of the step using them
    # Each training image view (see image_ops.Augment): "clip" = RandomResizedCrop + flip;
    # "mocov2" adds colour jitter, grayscale and blur (sigma scaled to the image size).
    data.augment = ml_collections.ConfigDict(
        {"recipe": "clip", "crop_scale": (0.9, 1.0), "flip": True}
    )
    data.max_skipped_fraction = 0.01  # bad records beyond this fraction stop the run
    # Resume even though the training source's records differ from those the checkpoint's
    # input position was saved over (its fingerprint: size and a hash of sampled records).
    data.allow_changed = False
    data.tokenizer = ml_collections.ConfigDict()
    data.tokenizer.path = ""  # a sentencepiece .model; "" trains one into the workdir
    data.tokenizer.vocab_size = 512  # only used when training a tokenizer
    return data


def _optim() -> ml_collections.ConfigDict:
    """AdamW (or SGD in Lookahead) on a warm-up and cosine schedule."""
    optim = ml_collections.ConfigDict()
    optim.name = "adamw"  # or "sgd_lookahead" (SGD + momentum inside Lookahead)
    optim.lr = 5e-4  # peak, after linear warm-up from 0; cosine decay to 0 at total_steps
    optim.warmup_steps = 2_000
    optim.warmup_from = 0.0  # learning rate at step 0
    optim.weight_decay = 0.2  # not on biases, norms or the logit scale
    optim.b1 = 0.9
    optim.b2 = 0.98
    optim.eps = 1e-6
    optim.grad_clip = 1.0  # global-norm clip; 0 disables
    # Parameters that never change: a regex over their '/'-joined names, matched whole (e.g.
    # "image_tower/.*"); they get no gradient, no update and no optimizer moments.
    optim.frozen = ""
    optim.momentum = 0.9  # sgd_lookahead only
    optim.lookahead_steps = 5  # sgd_lookahead: sync period k
    optim.lookahead_alpha = 0.5  # sgd_lookahead: slow step size
    return optim


def _evals() -> ml_collections.ConfigDict:
    """Evaluations, by name: zero-shot, retrieval and a linear probe on `shapes`. Each entry
    has a `kind` and that kind's fields (`clipjax.evaluate.fields`); results are logged as
    eval/<name>/<metric> every eval_every steps."""
    evals = ml_collections.ConfigDict()
    evals.shapes = eval_entry("zeroshot", source="shapes")
    evals.shapes_retrieval = eval_entry("retrieval", source="shapes")
    # Fitted on another random stream of the labelled split.
    evals.shapes_probe = eval_entry(
        "linear_probe", source="shapes", train_source="shapes:4096?seed=1"
    )
    return evals


def eval_entry(kind: str, **fields) -> ml_collections.ConfigDict:
    """A `config.evals` entry of `kind` with every field of its kind (defaults, then `fields`),
    so that each can be overridden from the command line."""
    if kind not in evaluate.KINDS:
        raise ConfigError(f"evaluation kind {kind!r} is not one of {', '.join(evaluate.KINDS)}.")
    entry = ml_collections.ConfigDict({"kind": kind, **evaluate.fields(kind)})
    entry.update(fields)
    return entry


def eval_settings(entry) -> ml_collections.ConfigDict:
    """One `config.evals` entry (a full one, or a dict of some fields) with its kind's
    defaults filled in."""
    return eval_entry(**dict(entry))


def clip_benchmark_recipe(
    c: ml_collections.ConfigDict, objective: str, lr: float, weight_decay: float
) -> ml_collections.ConfigDict:
    """The optimisation recipe of DeCLIP's CLIP-Benchmark codebase, shared by its methods
    (DeCLIP, SLIP, FILIP, DeFILIP): batch 4,096 for 128k steps, a warm-up from 1e-4 over 2,500
    steps, AdamW with b2 0.98 and eps 1e-8; each method's own peak `lr` and `weight_decay`."""
    c.objective = objective
    c.batch_size = 4096
    c.total_steps = 128_000
    c.optim.lr = lr
    c.optim.warmup_from = 1e-4
    c.optim.warmup_steps = 2_500
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.weight_decay = weight_decay
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

    c.model.dtype = "float32"  # the README's studies ran in float32; bfloat16 also pays here
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
    c.clip.chunked = False  # at batch 128 the all-gathered logits are small, and compile faster
    # Swept on shapes:2000 at 30 epochs (README "DeCLIP against CLIP"): 5e-4 was best for
    # CLIP (ahead of 2e-4, 1e-3, 2e-3, 4e-3) and for DeCLIP (ahead of 1e-3, 2e-3); on the
    # 100k-pair default `shapes` as well (CLIP's 600 steps: 49.6% zero-shot against 46.1%).
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.evals.shapes.num_examples = 512
    c.evals.shapes_retrieval.num_examples = 512
    c.evals.shapes_probe.num_examples = 512
    c.evals.shapes_probe.train_source = "shapes:2048?seed=1"
    return c
