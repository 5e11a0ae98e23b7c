"""Trained models outside the trainer: `clipjax.load(PATH)`.

  model = clipjax.load("/tmp/clip_local")          # a clipjax workdir (latest checkpoint)
  model = clipjax.load("/tmp/export")              # a folder clipjax.export wrote
  model = clipjax.load("/models/ViT-B-32-openai")  # an open_clip local-dir folder
  images = np.stack([model.preprocess(Image.open(p)) for p in paths])
  probs = softmax(model.logit_scale * model.encode_image(images) @ model.encode_text(
      model.tokenize(["a dog", "a cat"])).T)

An open_clip folder holds `open_clip_config.json` and `open_clip_model.safetensors`, as
open_clip's `save_for_hf` and `clipjax.export` write them. Its tokenizer is the folder's
`tokenizer=` path, else the folder's `tokenizer.model` (sentencepiece, clipjax exports) or
`bpe_simple_vocab_16e6.txt.gz`, else OpenAI's BPE vocabulary, which clipjax ships.
"""

import dataclasses
import functools
import json
import math
import os

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from clipjax import checkpoint, sharding, weights
from clipjax import config as config_lib
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.errors import ConfigError
from clipjax.evaluate import late_interaction, zeroshot
from clipjax.models.resnet import resnet_size
from clipjax.models.two_tower import TwoTower
from clipjax.models.vit import vit_size
from clipjax.objectives.filip import TokenWise
from clipjax.step import build

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
SENTENCEPIECE = "tokenizer.model"
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclasses.dataclass
class Model:
    """A two-tower model's weights with its tokenizer and image preprocessing.

    `config` is the clipjax config (a workdir's or an export's saved one; for open_clip
    folders, the base config with the imported `model` fields); `step` the checkpoint's step
    (None for imports)."""

    module: TwoTower
    variables: dict
    tokenizer: object
    config: ml_collections.ConfigDict
    interpolation: str = "bilinear"
    step: int | None = None
    batch_size: int = 256
    # FILIP: its scores are token-wise (`encode_*_tokens`, `zeroshot_logits`), as the run's
    # evaluations; its global embeddings are not what its loss trains.
    scores_tokens: bool = False

    @property
    def image_size(self) -> int:
        return self.config.model.image.size

    @property
    def context_length(self) -> int:
        return self.config.model.text.context_length

    @property
    def logit_scale(self) -> float:
        """s = exp θ, the factor on cosine similarities."""
        return math.exp(float(self.variables["params"]["log_scale"]))

    @property
    def logit_bias(self) -> float | None:
        bias = self.variables["params"].get("bias")
        return None if bias is None else float(bias)

    def tokenize(self, texts) -> np.ndarray:
        """list[str] -> int32 (n, context_length)."""
        return self.tokenizer.encode(list(texts), self.context_length)

    def preprocess(self, image) -> np.ndarray:
        """A PIL image or uint8 (H, W, 3|4) / (H, W) array -> uint8 (size, size, 3): the
        largest centred square, resized (`encode_image` standardises the pixels)."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, np.uint8))
        image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        size = self.image_size
        resized = image.resize((size, size), _RESAMPLE[self.interpolation], box=box)
        return np.asarray(resized)

    def encode_image(self, images) -> np.ndarray:
        """uint8 (n, size, size, 3) preprocessed images (standardised on the device with CLIP's
        mean and std, `models.two_tower.standardize`), or float32 ones already standardised ->
        float32 (n, embed_dim) unit vectors."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
        return self._batched(self._image_fn, images)

    def encode_text(self, tokens) -> np.ndarray:
        """int32 (n, L) tokens -> float32 (n, embed_dim) unit vectors."""
        return self._batched(self._text_fn, np.asarray(tokens, np.int32))

    def encode_image_tokens(self, images) -> np.ndarray:
        """As `encode_image`, for a FILIP model -> float32 (n, P, token_dim) unit patch tokens."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
        self._check_tokens()
        return self._batched(self._image_tokens_fn, images)

    def encode_text_tokens(self, tokens) -> np.ndarray:
        """int32 (n, L) tokens -> float32 (n, L, token_dim) unit token states of a FILIP model,
        the zero vector where FILIP leaves a token out (padding, the start token)."""
        self._check_tokens()
        return self._batched(self._text_tokens_fn, np.asarray(tokens, np.int32))

    def zeroshot_logits(self, images, prompts) -> np.ndarray:
        """Preprocessed images (n, size, size, 3) and one tokenised prompt per class (C, L) ->
        (n, C) logits, the zero-shot evaluation's scores times the logit scale: s·cos of the
        embeddings, or for FILIP σ_dense times the token-wise scores of `evaluate.zeroshot`."""
        if not self.scores_tokens:
            return self.logit_scale * self.encode_image(images) @ self.encode_text(prompts).T
        classes, mask = zeroshot.class_tokens(self.encode_text_tokens(prompts), len(prompts))
        image_tokens = self.encode_image_tokens(images)
        token_scale = math.exp(float(self.variables["params"]["token_heads"]["log_scale"]))
        return token_scale * late_interaction.scores(image_tokens, classes, key_mask=mask)

    def _batched(self, fn, inputs: np.ndarray) -> np.ndarray:
        if not len(inputs):
            like = jax.ShapeDtypeStruct((1, *inputs.shape[1:]), inputs.dtype)
            shape = jax.eval_shape(fn, self.variables, like).shape
            return np.zeros((0, *shape[1:]), np.float32)
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            pad = self.batch_size - len(chunk) if len(inputs) > self.batch_size else 0
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(fn(self.variables, chunk))[: len(chunk) - pad])
        return np.concatenate(out)

    def merge_into(self, variables: dict, model_config) -> dict:
        """`variables` (a new run's initial params and BatchNorm statistics, jax arrays in
        their shardings) with this model's values wherever their names match; objective heads
        this model lacks keep their initial values. ConfigError, in one line, when
        `model_config` (the run's `config.model`) has other shapes than this model."""
        theirs, ours = _model_shapes(self.config.model), _model_shapes(model_config)
        for field, value in theirs.items():
            if ours[field] != value:
                raise ConfigError(
                    f"config.init_from: the model has model.{field}={value!r}, this config "
                    f"{ours[field]!r}; set --config.model.{field}={value}."
                )
        loaded, current = weights.flatten(self.variables), weights.flatten(variables)
        replaced = {}
        for name, leaf in current.items():
            if name not in loaded:
                if name.split("/", 1)[1].startswith(_TOWERS):
                    raise ConfigError(f"config.init_from: the model has no {name}.")
                continue
            value = np.asarray(loaded[name], leaf.dtype)
            if value.shape != leaf.shape:
                raise ConfigError(
                    f"config.init_from: {name} has shape {value.shape}, this config's model "
                    f"{leaf.shape}; set config.model to the loaded model's shapes."
                )
            replaced[name] = jax.make_array_from_callback(
                leaf.shape, leaf.sharding, lambda index, value=value: value[index]
            )
        logging.info(
            "init_from: %d tensors loaded, %d kept their initial values (objective heads)",
            len(replaced),
            len(current) - len(replaced),
        )
        return flax.traverse_util.unflatten_dict({**current, **replaced}, sep="/")

    @functools.cached_property
    def _image_fn(self):
        return jax.jit(lambda v, x: self.module.apply(v, x, method=TwoTower.encode_image)["embed"])

    @functools.cached_property
    def _text_fn(self):
        return jax.jit(lambda v, x: self.module.apply(v, x, method=TwoTower.encode_text)["embed"])

    @functools.cached_property
    def _image_tokens_fn(self):
        return jax.jit(lambda v, x: self.module.apply(v, x, method=TokenWise.image_token_embed))

    @functools.cached_property
    def _text_tokens_fn(self):
        mask_padding = self.config.filip.mask_padding
        return jax.jit(
            lambda v, x: self.module.apply(v, x, mask_padding, method=TokenWise.text_token_embed)
        )

    def _check_tokens(self) -> None:
        if not self.scores_tokens:
            raise ConfigError(
                f"this {self.config.objective} model has no token-wise scores; FILIP models "
                "loaded from their workdir have them."
            )


# Leaves a loaded model must provide to a new run; the rest (objective heads) may start fresh.
_TOWERS = ("image_tower/", "text_tower/", "image_projection/", "text_projection/", "log_scale")


def _model_shapes(model_config) -> dict:
    """The `config.model` fields that fix the towers' weights, with -1 resolved."""
    image, text = model_config.image, model_config.text
    depth = width = output_dim = -1
    if image.variant.startswith("RN"):
        _, width, _, output_dim, _ = resnet_size(image.variant)
        width = width if image.width == -1 else image.width
        output_dim = output_dim if image.output_dim == -1 else image.output_dim
    else:
        depth = vit_size(image.variant)[1] if image.depth == -1 else image.depth
    return {
        "embed_dim": model_config.embed_dim,
        "quick_gelu": bool(model_config.quick_gelu),
        "image.variant": image.variant,
        "image.size": image.size,
        "image.depth": depth,
        "image.width": width,
        "image.output_dim": output_dim,
        **{f"text.{k}": text[k] for k in ("width", "depth", "heads", "context_length")},
        "text.vocab_size": text.vocab_size,
    }


def load(path: str, step: int | None = None, tokenizer: str | None = None) -> Model:
    """A clipjax workdir (checkpoint `step`, default the latest), a clipjax export, or an
    open_clip local-dir folder -> Model. ConfigError, in one line, if it cannot be loaded."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        if step is not None:
            raise ConfigError(f"{path} is an exported model with one set of weights; drop step.")
        return _load_open_clip(path, tokenizer)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _load_workdir(path, step)
    raise ConfigError(
        f"{path} is neither a clipjax workdir (config.json and checkpoints/) nor an open_clip "
        f"folder ({OPEN_CLIP_CONFIG} and {OPEN_CLIP_WEIGHTS})."
    )


def _load_workdir(workdir: str, step: int | None) -> Model:
    config = config_lib.load_saved(workdir)
    config.mesh = config_lib.base_config().mesh  # this machine's devices, data parallel
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, _, abstract_state, _ = build(config, mesh)
        ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts)
        try:
            state = ckpt.restore_state(abstract_state, step)
        finally:
            ckpt.close()
    if not (config.data.tokenizer.path or tokenizer_lib.saved_in(workdir)):
        raise ConfigError(
            f"{workdir} holds no {SENTENCEPIECE} and its config names no tokenizer path."
        )
    tokenizer = tokenizer_lib.load_or_train(config.data.tokenizer, workdir, captions=())
    variables = jax.device_get({"params": state.params, **state.model_state})
    scores_tokens = getattr(objective, "scores_tokens", False)
    return Model(
        objective.model,
        variables,
        tokenizer,
        config,
        step=int(state.step),
        scores_tokens=scores_tokens,
    )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} does not read as JSON ({e}).") from None


def _load_open_clip(folder: str, tokenizer_path: str | None) -> Model:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_path = os.path.join(folder, OPEN_CLIP_CONFIG)
    saved = _read_json(config_path)
    fields = weights.model_config_from_open_clip(saved.get("model_cfg", saved), config_path)
    run_config = os.path.join(folder, "config.json")
    if os.path.isfile(run_config):  # a clipjax export: the run's own config
        config = config_lib.load_saved(folder)
    else:  # imported weights: embeddings in float32, as open_clip computes them
        config = config_lib.base_config()
        config.model.dtype = "float32"
    config.model.update(fields["model"])
    module = TwoTower.from_config(config.model, bias_init=0.0 if fields["logit_bias"] else None)
    like = weights.abstract_leaves(module, config.model)
    weights_path = os.path.join(folder, OPEN_CLIP_WEIGHTS)
    try:
        state_dict = load_file(weights_path)
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{weights_path} does not load ({e}).") from None
    leaves = weights.from_state_dict(state_dict, module, like, weights_path)
    variables = flax.traverse_util.unflatten_dict(leaves, sep="/")
    model_cfg = saved.get("model_cfg", saved)
    tokenizer = _folder_tokenizer(folder, tokenizer_path, model_cfg.get("text_cfg", {}))
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model's text "
            f"tower embeds {config.model.text.vocab_size}; pass the tokenizer it was trained with."
        )
    preprocess = saved.get("preprocess_cfg", {})
    interpolation = preprocess.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLE:
        raise ConfigError(
            f"{config_path}: preprocess_cfg.interpolation={interpolation!r}; clipjax resizes "
            f"with {' or '.join(_RESAMPLE)}."
        )
    return Model(module, variables, tokenizer, config, interpolation=interpolation)


def _folder_tokenizer(folder: str, tokenizer_path: str | None, text_cfg: dict):
    """`tokenizer_path`, else the folder's own tokenizer, else OpenAI's BPE vocabulary (which
    clipjax ships), unless the model names a Hugging Face tokenizer instead."""
    own = [os.path.join(folder, name) for name in (SENTENCEPIECE, BPE_VOCAB)]
    path = tokenizer_path or next((p for p in own if os.path.isfile(p)), None)
    if path is None and (name := text_cfg.get("hf_tokenizer_name")):
        raise ConfigError(
            f"{folder}: its model uses the Hugging Face tokenizer {name!r}, which clipjax does "
            "not read; pass tokenizer= a sentencepiece model of the same vocabulary."
        )
    try:
        return tokenizer_lib.load(path or tokenizer_lib.OPENAI)  # open_clip's default
    except ValueError as e:
        raise ConfigError(str(e)) from None
