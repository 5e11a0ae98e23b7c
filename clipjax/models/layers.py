"""The pre-LayerNorm transformer shared by the image and the text towers (CLIP/open_clip shape).

Every parameter carries logical axis names ("embed", "mlp", "heads", "kv"); `clipjax/sharding.py`
maps them onto the mesh.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # CLIP's LayerNorm epsilon (Flax defaults to 1e-6)

ACTIVATION_AXES = ("batch", "length", "embed")
DENSE_INIT = nn.initializers.xavier_uniform()
# Xavier over the fused head axes, as for a (width, heads * head_dim) matrix.
QKV_INIT = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
OUT_INIT = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)


def layer_norm(dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v/out biases: (B, L, W) -> (B, L, W)."""

    heads: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"Width {width} is not divisible by {self.heads} attention heads.")
        head_dim = width // self.heads

        # Einsum kernels keep their (embed, heads, kv) shape from init on, so the logical
        # axis names apply to the array as created (DenseGeneral initialises it flat).
        def project(name):  # (B, L, W) -> (B, L, heads, head_dim)
            return nn.Einsum(
                (width, self.heads, head_dim),
                "BLW,WHD->BLHD",
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(QKV_INIT, ("embed", "heads", "kv")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )(x)

        # jax.nn.dot_product_attention takes the softmax in float32 even for bfloat16 inputs.
        out = jax.nn.dot_product_attention(
            project("query"), project("key"), project("value"), is_causal=self.causal
        )
        return nn.Einsum(
            (self.heads, head_dim, width),
            "BLHD,HDW->BLW",
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(OUT_INIT, ("heads", "kv", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)


def quick_gelu(x):
    """x · σ(1.702 x): the GELU approximation OpenAI's CLIP models were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Dense(mlp_dim) -> GELU -> Dense(width), with biases: (B, L, W) -> (B, L, W).

    GELU is exact (torch's, as open_clip uses) or, with `quick_gelu`, OpenAI's approximation.
    """

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    quick_gelu: bool = False

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(DENSE_INIT, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="fc_in",
        )(x)
        x = quick_gelu(x) if self.quick_gelu else nn.gelu(x, approximate=False)
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(DENSE_INIT, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="fc_out",
        )(x)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x)). (B, L, W) -> (B, L, W)."""

    heads: int
    mlp_dim: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    quick_gelu: bool = False

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.heads, self.causal, self.dtype, name="attn")(
            layer_norm(self.dtype, "ln_attn")(x)
        )
        mlp = Mlp(self.mlp_dim, self.dtype, self.quick_gelu, name="mlp")
        x = x + mlp(layer_norm(self.dtype, "ln_mlp")(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class Transformer(nn.Module):
    """`depth` pre-LN blocks named block_00, block_01, ...: (B, L, W) -> (B, L, W)."""

    depth: int
    heads: int
    mlp_dim: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    quick_gelu: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        for i in range(self.depth):
            x = Block(
                self.heads,
                self.mlp_dim,
                self.causal,
                self.dtype,
                self.quick_gelu,
                name=f"block_{i:02d}",
            )(x)
        return x
