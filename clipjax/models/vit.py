"""CLIP's Vision Transformer (open_clip shape), sized by a variant string such as "B/32"."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.layers import Linear, TowerOptions, layer_norm, tower_transformer

# size -> (width, depth, mlp_dim, heads)
VIT_SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def vit_size(variant: str) -> tuple[int, int, int, int, int]:
    """(width, depth, mlp_dim, heads, patch) of a "<size>/<patch>" variant, e.g. "B/32"."""
    size, _, patch = variant.partition("/")
    if size not in VIT_SIZES or not patch.isdigit() or int(patch) == 0:
        raise ValueError(
            f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size one of "
            f"{', '.join(VIT_SIZES)} and a positive integer patch, e.g. 'B/32'."
        )
    return (*VIT_SIZES[size], int(patch))


class VisionTransformer(nn.Module):
    """Images (B, H, W, 3), already normalised -> pooled feature (B, width): ln_post(class token);
    with `tokens=True`, (pooled, the patch tokens (B, P, width) before ln_post) (FILIP's).

    The positional embedding has one entry per patch plus the class token, so its length is
    fixed by the image size seen at init.
    """

    variant: str
    depth: int = -1  # -1: the variant's own depth
    options: TowerOptions = TowerOptions()
    patch_dropout: float = 0.0  # in training, drop this fraction of the patch tokens (FLIP)

    @nn.compact
    def __call__(self, images, train: bool = False, tokens: bool = False):
        width, depth, mlp_dim, heads, patch = vit_size(self.variant)
        height, image_width = images.shape[1:3]
        if height % patch or image_width % patch:
            raise ValueError(
                f"model.image.size={height}x{image_width} is not divisible by the patch size "
                f"{patch} of ViT variant {self.variant!r}; use a multiple of {patch}."
            )
        # The patch embedding: a stride-`patch` convolution, taken as one product over each
        # patch's pixels (its kernel keeps the convolution's (patch, patch, 3, width) layout).
        batch, channels = images.shape[0], images.shape[3]
        patches = images.reshape(
            batch, height // patch, patch, image_width // patch, patch, channels
        )
        x = Linear(
            "bhpwqc,pqcd->bhwd",
            (patch, patch, channels, width),
            (None, None, None, "embed"),
            use_bias=False,
            kernel_init=nn.initializers.lecun_normal(),
            dtype=self.options.dtype,
            name="patch_embed",
        )(patches)
        x = x.reshape(batch, -1, width)  # (B, patches, width), row-major like the conv's

        embed_init = nn.initializers.normal(width**-0.5)  # CLIP's scale for both
        class_token = self.param(
            "class_token", nn.with_logical_partitioning(embed_init, ("embed",)), (width,)
        )
        class_tokens = jnp.broadcast_to(class_token, (x.shape[0], 1, width))
        x = jnp.concatenate([class_tokens, x], axis=1)
        pos_embed = self.param(
            "pos_embed", nn.with_logical_partitioning(embed_init, (None, "embed")), x.shape[1:]
        )
        x = x + pos_embed
        if train and self.patch_dropout > 0:
            x = drop_patches(x, self.make_rng("patch_dropout"), self.patch_dropout)

        x = layer_norm("ln_pre")(x)
        x = tower_transformer(
            self.options, depth if self.depth == -1 else self.depth, heads, mlp_dim
        )(x)
        pooled = nn.with_logical_constraint(layer_norm("ln_post")(x[:, 0]), ("batch", "embed"))
        return (pooled, x[:, 1:]) if tokens else pooled


def drop_patches(tokens, rng, rate: float):
    """FLIP's patch dropout (Li et al. 2023; open_clip's PatchDropout): of tokens (B, 1 + P,
    width), the class token first, keep the class token and a random max(1, ⌊(1 - rate)·P⌋) of
    the P patch tokens of each example, drawn from `rng`; after the positional embedding, so
    each kept token still says where it came from."""
    batch, length, width = tokens.shape
    keep = max(1, int((length - 1) * (1 - rate)))
    kept = jax.lax.top_k(jax.random.normal(rng, (batch, length - 1)), keep)[1]
    patches = jnp.take_along_axis(tokens[:, 1:], kept[..., None], axis=1)
    return jnp.concatenate([tokens[:, :1], patches], axis=1)
