"""CLIP's modified ResNet image tower (Radford et al. 2021), sized by a variant such as "RN50".

It differs from a torchvision ResNet in three ways: a stem of three 3x3 convolutions followed by
an average pool; strided convolutions replaced by a stride-1 convolution then an average pool
(anti-aliasing); and attention pooling instead of global average pooling. Images are NHWC.

Logical axis names: "conv_in" / "conv_out" on convolution and BatchNorm parameters; the attention
pool uses the transformer's "embed", "heads" and "kv". BatchNorm statistics live in the
`batch_stats` collection.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# variant -> (blocks per stage, stem width, output_dim, image size)
RESNET_SIZES = {
    "RN50": ((3, 4, 6, 3), 64, 1024, 224),
    "RN101": ((3, 4, 23, 3), 64, 512, 224),
    "RN50x4": ((4, 6, 10, 6), 80, 640, 288),
    "RN50x16": ((6, 8, 18, 8), 96, 768, 384),
}
EXPANSION = 4  # bottleneck output channels per `planes`
TOTAL_STRIDE = 32  # stem conv 2 x stem pool 2 x three strided stages
HEAD_DIM = 64

CONV_AXES = (None, None, "conv_in", "conv_out")
ACTIVATION_AXES = ("batch", None, None, None)  # convolutions stay data parallel
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He, untruncated


def attention_heads(width: int) -> int:
    """Heads of the attention pool: 64-dim heads over the final width * 32 channels (CLIP)."""
    return width * 32 // HEAD_DIM


def resnet_size(variant: str) -> tuple[tuple[int, ...], int, int, int, int]:
    """(blocks per stage, width, heads, output_dim, default image size) of e.g. "RN50"."""
    if variant not in RESNET_SIZES:
        raise ValueError(
            f"Unknown ResNet variant {variant!r}: expected one of {', '.join(RESNET_SIZES)}."
        )
    layers, width, output_dim, image_size = RESNET_SIZES[variant]
    return layers, width, attention_heads(width), output_dim, image_size


def _conv(features: int, kernel: int, dtype, name: str, strides: int = 1) -> nn.Conv:
    """Bias-free convolution with PyTorch's symmetric padding (kernel // 2 on each side)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=strides,
        padding=kernel // 2,
        use_bias=False,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(CONV_INIT, CONV_AXES),
        name=name,
    )


def _batch_norm(train: bool, dtype, name: str, scale_init=nn.initializers.ones) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,  # PyTorch's momentum 0.1
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _avg_pool(x, stride: int):
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avg-pool(stride) -> 1x1 (x4 channels), plus the shortcut, then ReLU.

    (B, H, W, C) -> (B, H / stride, W / stride, 4 * planes). The shortcut is avg-pool(stride) ->
    1x1 conv -> BN when the stride or the channel count changes, else the identity.
    """

    planes: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        out_channels = EXPANSION * self.planes
        out = _conv(self.planes, 1, self.dtype, "conv1")(x)
        out = nn.relu(_batch_norm(train, self.dtype, "bn1")(out))
        out = _conv(self.planes, 3, self.dtype, "conv2")(out)
        out = nn.relu(_batch_norm(train, self.dtype, "bn2")(out))
        if self.stride > 1:
            out = _avg_pool(out, self.stride)
        out = _conv(out_channels, 1, self.dtype, "conv3")(out)
        # CLIP zero-initialises the last BN scale, so every block starts as its shortcut.
        out = _batch_norm(train, self.dtype, "bn3", nn.initializers.zeros)(out)
        if self.stride > 1 or x.shape[-1] != out_channels:
            if self.stride > 1:
                x = _avg_pool(x, self.stride)
            x = _conv(out_channels, 1, self.dtype, "downsample_conv")(x)
            x = _batch_norm(train, self.dtype, "downsample_bn")(x)
        return nn.relu(out + x)


class AttentionPool(nn.Module):
    """CLIP's attention pooling: (B, H, W, C) -> (B, output_dim).

    The grid's mean is prepended as a token, a learned positional embedding (H*W + 1, C) is
    added, and one multi-head attention (q/k/v/out with biases) runs with the mean token as the
    only query. The positional embedding's length is fixed by the image size seen at init.
    """

    heads: int
    output_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        head_dim = channels // self.heads
        x = x.reshape(batch, height * width, channels)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        # CLIP's scale channels^-0.5 for the positional embedding and all four projections.
        init = nn.initializers.normal(channels**-0.5)
        pos_embed = self.param(
            "pos_embed", nn.with_logical_partitioning(init, (None, "embed")), x.shape[1:]
        )
        x = x + pos_embed.astype(self.dtype)

        def project(name, tokens):  # (B, L, C) -> (B, L, heads, head_dim)
            return nn.Einsum(
                (channels, self.heads, head_dim),
                "BLC,CHD->BLHD",
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )(tokens)

        out = jax.nn.dot_product_attention(
            project("query", x[:, :1]), project("key", x), project("value", x)
        )
        out = nn.Einsum(
            (self.heads, head_dim, self.output_dim),
            "BLHD,HDO->BLO",
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    """Images (B, H, W, 3), already normalised, H and W multiples of 32 -> (B, output_dim).

    `width` overrides the variant's stem width (e.g. RN50's blocks at width 16 on CPU); the
    attention pool then has width * 32 / 64 heads. `output_dim` overrides the attention pool's
    output width (an imported open_clip model's embedding width). `train` makes BatchNorm use
    and update batch statistics (apply with `mutable=["batch_stats"]`).
    """

    variant: str
    width: int = -1  # -1: the variant's own width
    dtype: jnp.dtype = jnp.float32
    output_dim: int = -1  # -1: the variant's own

    @nn.compact
    def __call__(self, images, train: bool = False):
        layers, width, heads, output_dim, _ = resnet_size(self.variant)
        if self.output_dim != -1:
            output_dim = self.output_dim
        if self.width != -1:
            if self.width <= 0 or self.width % 2:
                raise ValueError(
                    f"model.image.width={self.width}: a ResNet width must be a positive even "
                    "number, or -1 for the variant's own."
                )
            width, heads = self.width, attention_heads(self.width)
        height, image_width = images.shape[1:3]
        if height % TOTAL_STRIDE or image_width % TOTAL_STRIDE:
            raise ValueError(
                f"model.image.size={height}x{image_width} is not a multiple of {TOTAL_STRIDE}, "
                f"the total stride of ResNet variant {self.variant!r}."
            )

        x = nn.with_logical_constraint(images, ACTIVATION_AXES)
        for i, features in enumerate((width // 2, width // 2, width), start=1):
            x = _conv(features, 3, self.dtype, f"stem_conv{i}", strides=2 if i == 1 else 1)(x)
            x = nn.relu(_batch_norm(train, self.dtype, f"stem_bn{i}")(x))
        x = _avg_pool(x, 2)

        for stage, blocks in enumerate(layers):
            for block in range(blocks):
                x = Bottleneck(
                    width * 2**stage,
                    stride=2 if stage > 0 and block == 0 else 1,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block_{block:02d}",
                )(x, train)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        pooled = AttentionPool(heads, output_dim, self.dtype, name="attn_pool")(x)
        return nn.with_logical_constraint(pooled, ("batch", "embed"))
