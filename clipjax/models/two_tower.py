"""The two-tower model: image and text towers, projections, the logit scale and objective heads."""

import functools
import math

import flax.linen as nn
import jax.numpy as jnp

from clipjax.models.heads import MaskedLMHead, MIBlock, PriorDiscriminator, SimSiamHead
from clipjax.models.resnet import ModifiedResNet, resnet_size
from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer, vit_size

LOGIT_SCALE_INIT = math.log(1 / 0.07)


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
    """Image and text towers mapped into one joint space, plus what the objectives add.

    Parameters: image_tower, text_tower, image_projection, text_projection, log_scale (θ, the
    logit scale in log space; each objective maps it to s = exp(θ) with its own clamp), and
    optionally `bias` (SigLIP) and `image_prior` / `text_prior` discriminators (CLIP-Lite).
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
    projection: str = "linear"
    log_scale_init: float = LOGIT_SCALE_INIT
    bias_init: float | None = None  # a learned logit bias when set (SigLIP)
    priors: tuple[str, ...] = ()  # prior discriminators on "image" / "text" features
    view_critics: tuple[str, ...] = ()  # CLIP-Lite's "image" / "text" view-to-view critics
    simsiam_bn_groups: int = 0  # > 0: a SimSiam head whose BatchNorm uses this many groups
    mlm_max_masked: int = 0  # > 0: a masked-LM head scoring this many positions a caption
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, model_config, **objective_fields) -> "TwoTower":
        """From the `config.model` ConfigDict (see `clipjax/config.py`); objectives add their
        own fields (`log_scale_init`, `bias_init`, `priors`, `view_critics`,
        `simsiam_bn_groups`, `mlm_max_masked`)."""
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
            text_vocab_size=text.vocab_size,
            text_context_length=text.context_length,
            text_width=text.width,
            text_depth=text.depth,
            text_heads=text.heads,
            projection=model_config.projection,
            dtype=jnp.dtype(model_config.dtype),
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
        if self.image_variant.startswith("RN"):
            self.image_tower = ModifiedResNet(
                self.image_variant, self.image_width, self.dtype, self.image_output_dim
            )
        else:
            self.image_tower = VisionTransformer(
                self.image_variant,
                self.image_depth,
                self.dtype,
                self.quick_gelu,
                self.scan_layers,
                self.remat,
            )
        self.text_tower = TextTransformer(
            self.text_vocab_size,
            self.text_context_length,
            self.text_width,
            self.text_depth,
            self.text_heads,
            dtype=self.dtype,
            quick_gelu=self.quick_gelu,
            scan_layers=self.scan_layers,
            remat=self.remat,
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
        self.image_prior = PriorDiscriminator() if "image" in self.priors else None
        self.text_prior = PriorDiscriminator() if "text" in self.priors else None
        self.image_view_critic = MIBlock(self.embed_dim) if "image" in self.view_critics else None
        self.text_view_critic = MIBlock(self.embed_dim) if "text" in self.view_critics else None
        self.view_log_scales = {
            kind: self.param(
                f"{kind}_view_log_scale", scalar(nn.initializers.constant(LOGIT_SCALE_INIT)), ()
            )
            for kind in self.view_critics
        }
        if self.simsiam_bn_groups:
            self.simsiam = SimSiamHead(self.simsiam_bn_groups)
        if self.mlm_max_masked:
            self.masked_lm = MaskedLMHead(self.text_vocab_size, self.mlm_max_masked)

    def _project(self, projection, features, train):
        if self.projection == "mi_block":
            return _normalize(projection(features, train=train))
        return _normalize(projection(features))

    def encode_image(self, images, train: bool = False):
        """Images (B, H, W, 3) -> features (B, width_v) before projection, embed (B, embed_dim)
        L2-normalised; both float32. width_v is the ViT width or the ResNet's output_dim.

        `train` puts BatchNorm (ResNet, MI block) in training mode (apply with
        `mutable=["batch_stats"]`)."""
        if isinstance(self.image_tower, ModifiedResNet):
            features = self.image_tower(images, train=train)
        else:
            features = self.image_tower(images)
        features = features.astype(jnp.float32)
        return {
            "features": features,
            "embed": self._project(self.image_projection, features, train),
        }

    def encode_text(self, tokens, train: bool = False):
        """Tokens (B, L) -> features (B, width_t) at end-of-text, states (B, L, width_t)
        final-LN token states, embed (B, embed_dim) L2-normalised; all float32."""
        pooled, states = self.text_tower(tokens)
        features = pooled.astype(jnp.float32)
        return {
            "features": features,
            "states": states.astype(jnp.float32),
            "embed": self._project(self.text_projection, features, train),
        }

    def view_embed(self, kind: str, features, train: bool = False):
        """A view critic's unit embedding (B, embed_dim) of "image" or "text" tower features."""
        critic = {"image": self.image_view_critic, "text": self.text_view_critic}[kind]
        return _normalize(critic(features, train=train))

    def discriminate(self, kind: str, features):
        """Prior-discriminator logits (B,) of the "image" or "text" prior on features (B, d)."""
        return {"image": self.image_prior, "text": self.text_prior}[kind](features)

    def __call__(self, images, tokens, train: bool = False, mlm_labels=None):
        """Both encodings and `log_scale` θ; where the model has them, the logit `bias`, the
        prior discriminators' logits on the tower features (`prior_logits`, by kind), the
        view critics' embeddings (`<kind>.view_embed`) and log temperatures
        (`view_log_scales`), the SimSiam head's (z, p) on the image features
        (`image.simsiam`), and the masked-LM
        head's (logits, labels) at the masked positions of `mlm_labels` (`text.mlm`)."""
        out = {
            "image": self.encode_image(images, train=train),
            "text": self.encode_text(tokens, train=train),
            "log_scale": self.log_scale,
        }
        if self.simsiam_bn_groups:
            out["image"]["simsiam"] = self.simsiam(out["image"]["features"], train=train)
        if self.mlm_max_masked:
            labels = jnp.zeros_like(tokens) if mlm_labels is None else mlm_labels
            out["text"]["mlm"] = self.masked_lm(out["text"]["states"], labels)
        if self.bias_init is not None:
            out["bias"] = self.bias
        if self.priors:
            out["prior_logits"] = {k: self.discriminate(k, out[k]["features"]) for k in self.priors}
        for kind in self.view_critics:
            out[kind]["view_embed"] = self.view_embed(kind, out[kind]["features"], train=train)
        if self.view_critics:
            out["view_log_scales"] = self.view_log_scales
        return out
