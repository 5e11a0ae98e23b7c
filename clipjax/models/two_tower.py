"""The two-tower model: image and text towers, projections, the logit scale and a logit bias.

Objectives that add heads subclass it in their own module (DeCLIP's SimSiam and masked-LM
heads, CLIP-Lite's prior discriminators and view critics), so a new method touches only its
own file."""

import functools
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clipjax.models.heads import MIBlock
from clipjax.models.layers import TowerOptions
from clipjax.models.resnet import ModifiedResNet, resnet_size
from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer, vit_size

LOGIT_SCALE_INIT = math.log(1 / 0.07)
# CLIP's per-channel pixel mean and standard deviation (RGB, pixels in [0, 1]).
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def standardize(images, dtype=jnp.float32):
    """Images as the towers take them, in `dtype`: uint8 (..., 3) pixels are scaled to [0, 1]
    and standardised with `IMAGE_MEAN` and `IMAGE_STD` in float32 first; float images are taken
    as already standardised. Batches stay uint8 from the input workers to here, a quarter of
    float32's bytes, and the arithmetic fuses into the first layer."""
    if images.dtype == jnp.uint8:
        images = (images.astype(jnp.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    return images.astype(dtype)


def _projection(embed_dim: int, name: str) -> nn.Dense:
    """Linear map to the joint space without bias, in float32 (it is small)."""
    return nn.Dense(
        embed_dim,
        use_bias=False,
        # CLIP's scale width^-0.5, i.e. unit fan-in variance.
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal"), ("embed", "joint")
        ),
        name=name,
    )


def normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TwoTower(nn.Module):
    """Image and text towers mapped into one joint space.

    Parameters: image_tower, text_tower, image_projection, text_projection, log_scale (θ, the
    logit scale in log space; each objective maps it to s = exp(θ) with its own clamp), and
    optionally `bias` (SigLIP).
    The image tower is a ModifiedResNet for variants named "RN..." (its BatchNorm statistics in
    `batch_stats`), else a VisionTransformer. The projections are linear maps ("linear") or
    CLIP-Lite's MI blocks ("mi_block"). Build it from `config.model` with `from_config`.
    """

    embed_dim: int
    image_variant: str
    text_vocab_size: int
    text_context_length: int
    text_width: int
    text_depth: int
    text_heads: int
    image_depth: int = -1  # ViT only
    image_width: int = -1  # ResNet only
    image_output_dim: int = -1  # ResNet only: the attention pool's output width
    quick_gelu: bool = False  # OpenAI's GELU approximation in both transformers
    scan_layers: bool = False  # nn.scan over the transformer blocks of both towers
    remat: str = "none"  # what the blocks' backward pass keeps (layers.REMAT_POLICIES)
    attention: str = "auto"  # the blocks' attention kernel (layers.ATTENTION_IMPLEMENTATIONS)
    projection: str = "linear"
    log_scale_init: float = LOGIT_SCALE_INIT
    bias_init: float | None = None  # a learned logit bias when set (SigLIP)
    dtype: jnp.dtype = jnp.float32
    # A locked tower (LiT) keeps its BatchNorm statistics: training runs it in inference mode.
    image_locked: bool = False
    text_locked: bool = False
    patch_dropout: float = 0.0  # ViT: the fraction of patch tokens dropped in training (FLIP)

    @classmethod
    def from_config(cls, model_config, **objective_fields) -> "TwoTower":
        """From the `config.model` ConfigDict (see `clipjax/config.py`); objectives add their
        own fields (`log_scale_init`, `bias_init`, and those of their subclasses)."""
        image, text = model_config.image, model_config.text
        return cls(
            embed_dim=model_config.embed_dim,
            image_variant=image.variant,
            image_depth=image.depth,
            image_width=image.width,
            image_output_dim=image.output_dim,
            quick_gelu=model_config.quick_gelu,
            scan_layers=model_config.scan_layers,
            remat=model_config.remat,
            attention=model_config.attention,
            text_vocab_size=text.vocab_size,
            text_context_length=text.context_length,
            text_width=text.width,
            text_depth=text.depth,
            text_heads=text.heads,
            projection=model_config.projection,
            dtype=jnp.dtype(model_config.dtype),
            image_locked=image.locked,
            text_locked=text.locked,
            patch_dropout=image.patch_dropout,
            **objective_fields,
        )

    @property
    def image_features_dim(self) -> int:
        """Width of the image tower's pooled feature: the ViT width or the ResNet output."""
        if self.image_variant.startswith("RN"):
            return (
                self.image_output_dim
                if self.image_output_dim != -1
                else resnet_size(self.image_variant)[3]
            )
        return vit_size(self.image_variant)[0]

    def setup(self):
        options = TowerOptions(
            self.dtype, self.quick_gelu, self.scan_layers, self.remat, self.attention
        )
        if self.image_variant.startswith("RN"):
            self.image_tower = ModifiedResNet(
                self.image_variant, self.image_width, self.dtype, self.image_output_dim
            )
        else:
            self.image_tower = VisionTransformer(
                self.image_variant, self.image_depth, options, self.patch_dropout
            )
        self.text_tower = TextTransformer(
            self.text_vocab_size,
            self.text_context_length,
            self.text_width,
            self.text_depth,
            self.text_heads,
            options=options,
        )
        if self.projection == "linear":
            self.image_projection = _projection(self.embed_dim, "image_projection")
            self.text_projection = _projection(self.embed_dim, "text_projection")
        elif self.projection == "mi_block":
            self.image_projection = MIBlock(self.embed_dim)
            self.text_projection = MIBlock(self.embed_dim)
        else:
            raise ValueError(
                f"model.projection={self.projection!r} is unknown; use 'linear' or 'mi_block'."
            )
        scalar = functools.partial(nn.with_logical_partitioning, names=())
        self.log_scale = self.param(
            "log_scale", scalar(nn.initializers.constant(self.log_scale_init)), ()
        )
        if self.bias_init is not None:
            self.bias = self.param("bias", scalar(nn.initializers.constant(self.bias_init)), ())

    def _project(self, projection, features, train):
        if self.projection == "mi_block":
            return normalize(projection(features, train=train))
        return normalize(projection(features))

    def encode_image(self, images, train: bool = False, tokens: bool = False):
        """Images (B, H, W, 3), uint8 pixels or float standardised ones (see `standardize`) ->
        features (B, width_v) before projection, embed (B, embed_dim) L2-normalised; both
        float32. width_v is the ViT width or the ResNet's output_dim.

        `train` puts BatchNorm (ResNet, MI block) in training mode (apply with
        `mutable=["batch_stats"]`) unless the tower is locked, and drops patches (a ViT with
        `patch_dropout`; apply with `rngs={"patch_dropout": key}`). `tokens` adds a ViT's patch
        tokens before ln_post (`tokens`, (B, P, width_v) float32)."""
        images = standardize(images, self.dtype)
        out = {}
        if isinstance(self.image_tower, ModifiedResNet):
            features = self.image_tower(images, train=train and not self.image_locked)
        elif tokens:
            features, patch_tokens = self.image_tower(images, train=train, tokens=True)
            out["tokens"] = patch_tokens.astype(jnp.float32)
        else:
            features = self.image_tower(images, train=train)
        features = features.astype(jnp.float32)
        return {
            **out,
            "features": features,
            "embed": self._project(
                self.image_projection, features, train and not self.image_locked
            ),
        }

    def encode_text(self, tokens, train: bool = False):
        """Tokens (B, L) -> features (B, width_t) at end-of-text, states (B, L, width_t)
        final-LN token states, embed (B, embed_dim) L2-normalised; all float32."""
        pooled, states = self.text_tower(tokens)
        features = pooled.astype(jnp.float32)
        return {
            "features": features,
            "states": states.astype(jnp.float32),
            "embed": self._project(self.text_projection, features, train and not self.text_locked),
        }

    def __call__(self, images, tokens, train: bool = False):
        """Both encodings, `log_scale` θ and, where the model has one, the logit `bias`."""
        out = {
            "image": self.encode_image(images, train=train),
            "text": self.encode_text(tokens, train=train),
            "log_scale": self.log_scale,
        }
        if self.bias_init is not None:
            out["bias"] = self.bias
        return out
