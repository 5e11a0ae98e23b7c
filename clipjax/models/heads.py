"""Heads that objectives add to the two towers: CLIP-Lite's MI block and prior discriminator."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.layers import LN_EPS

DENSE_INIT = nn.initializers.lecun_normal()


def identity_like_init(key, shape, dtype=jnp.float32):
    """U(-0.01, 0.01) with the diagonal set to 1: a near-identity map when out >= in."""
    fan_in, fan_out = shape
    if fan_out < fan_in:  # no identity to start from; as the official code, keep the default
        return DENSE_INIT(key, shape, dtype)
    kernel = jax.random.uniform(key, shape, dtype, -0.01, 0.01)
    return kernel.at[jnp.arange(fan_in), jnp.arange(fan_in)].set(1.0)


def _dense(features, names, use_bias=True, kernel_init=DENSE_INIT, name=None):
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
        name=name,
    )


class MIBlock(nn.Module):
    """CLIP-Lite / Deep InfoMax critic encoder: (B, d) -> (B, features).

    `LayerNorm([Linear(no bias) - BN - ReLU - Linear](x) + Linear_shortcut(x))`, the bias-free
    shortcut initialised near the identity so the block starts close to a linear projection.
    """

    features: int = 2048

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = _dense(self.features, ("embed", "mlp"), use_bias=False, name="fc_in")(x)
        h = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,  # PyTorch's momentum 0.1
            epsilon=1e-5,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="bn",
        )(h)
        h = _dense(self.features, ("mlp", "joint"), name="fc_out")(nn.relu(h))
        shortcut = _dense(
            self.features,
            ("embed", "joint"),
            use_bias=False,
            kernel_init=identity_like_init,
            name="shortcut",
        )(x)
        return nn.LayerNorm(
            epsilon=LN_EPS,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("joint",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("joint",)),
            name="ln",
        )(h + shortcut)


class PriorDiscriminator(nn.Module):
    """Deep InfoMax prior discriminator D: (B, d) -> (B,) logits (D = sigmoid of them).

    MLP d -> 1000 -> 200 -> 1 with ReLUs.
    """

    @nn.compact
    def __call__(self, x):
        x = nn.relu(_dense(1000, ("embed", "mlp"), name="fc_1")(x))
        x = nn.relu(_dense(200, ("mlp", None), name="fc_2")(x))
        return _dense(1, (None, None), name="fc_3")(x)[..., 0]
