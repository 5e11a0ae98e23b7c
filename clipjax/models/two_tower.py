"""The CLIP two-tower model: image and text towers, linear projections and the logit scale."""

import math

import flax.linen as nn
import jax.numpy as jnp

from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


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


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TwoTower(nn.Module):
    """CLIP: `encode_image`, `encode_text` and `__call__` (both) via `model.apply(..., method=)`.

    Parameters: image_tower, text_tower, image_projection, text_projection, logit_scale.
    Build it from `config.model` with `TwoTower.from_config`.
    """

    embed_dim: int
    image_variant: str
    text_vocab_size: int
    text_context_length: int
    text_width: int
    text_depth: int
    text_heads: int
    image_depth: int = -1
    image_model: str = "vit"  # the only image tower so far
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, model_config) -> "TwoTower":
        """From the `config.model` ConfigDict (see `clipjax/config.py`)."""
        image, text = model_config.image, model_config.text
        return cls(
            embed_dim=model_config.embed_dim,
            image_variant=image.variant,
            image_depth=image.depth,
            text_vocab_size=text.vocab_size,
            text_context_length=text.context_length,
            text_width=text.width,
            text_depth=text.depth,
            text_heads=text.heads,
            dtype=jnp.dtype(model_config.dtype),
        )

    def setup(self):
        if self.image_model != "vit":
            raise ValueError(f"Unknown image tower {self.image_model!r}; expected 'vit'.")
        self.image_tower = VisionTransformer(self.image_variant, self.image_depth, self.dtype)
        self.text_tower = TextTransformer(
            self.text_vocab_size,
            self.text_context_length,
            self.text_width,
            self.text_depth,
            self.text_heads,
            dtype=self.dtype,
        )
        self.image_projection = _projection(self.embed_dim, "image_projection")
        self.text_projection = _projection(self.embed_dim, "text_projection")
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(LOGIT_SCALE_INIT), ()),
            (),
        )

    def encode_image(self, images):
        """Images (B, H, W, 3) -> features (B, width_v) before projection, embed (B, embed_dim)
        L2-normalised; both float32."""
        features = self.image_tower(images).astype(jnp.float32)
        return {"features": features, "embed": _normalize(self.image_projection(features))}

    def encode_text(self, tokens):
        """Tokens (B, L) -> features (B, width_t) at end-of-text, states (B, L, width_t)
        final-LN token states, embed (B, embed_dim) L2-normalised; all float32."""
        pooled, states = self.text_tower(tokens)
        features = pooled.astype(jnp.float32)
        return {
            "features": features,
            "states": states.astype(jnp.float32),
            "embed": _normalize(self.text_projection(features)),
        }

    def __call__(self, images, tokens):
        """Both encodings and the logit scale exp(logit_scale), capped at 100."""
        return {
            "image": self.encode_image(images),
            "text": self.encode_text(tokens),
            "logit_scale": jnp.minimum(jnp.exp(self.logit_scale), LOGIT_SCALE_MAX),
        }
