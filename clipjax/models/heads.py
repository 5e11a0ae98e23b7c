"""Heads that objectives add to the two towers: CLIP-Lite's MI block and prior discriminator,
DeCLIP's SimSiam and masked-LM heads, SLIP's SimCLR head and FILIP's token mappings."""

import math

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


class GroupBatchNorm(nn.Module):
    """BatchNorm over (B, F) with statistics per group of B/groups consecutive rows.

    Under `jit` the batch is one global array, so a plain BatchNorm would use statistics of the
    whole batch (synchronised BN). The batch is laid out over the data-parallel devices in
    contiguous blocks, so `groups` = that device count gives per-device statistics, as the
    official DeCLIP code has; `groups=1` syncs them. Running averages take the group mean.
    """

    groups: int = 1
    use_affine: bool = True
    momentum: float = 0.9  # PyTorch's momentum 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = x.shape[-1]
        mean_avg = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        var_avg = self.variable("batch_stats", "var", jnp.ones, (features,))
        if train:
            grouped = x.reshape(self.groups, -1, features)
            mean = grouped.mean(axis=1, keepdims=True)
            var = grouped.var(axis=1, keepdims=True)
            y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                m = self.momentum
                mean_avg.value = m * mean_avg.value + (1 - m) * mean.mean(axis=(0, 1))
                var_avg.value = m * var_avg.value + (1 - m) * var.mean(axis=(0, 1))
        else:
            y = (x - mean_avg.value) * jax.lax.rsqrt(var_avg.value + self.epsilon)
        if not self.use_affine:
            return y
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)), (features,)
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (features,)
        )
        return y * scale + bias


class SimSiamHead(nn.Module):
    """DeCLIP's image self-supervision head: projector g and predictor h (SimSiam).

    g: Linear(d, 1024)-BN-ReLU-Linear(1024, 1024)-BN-ReLU-Linear(1024, 1024)-BN.
    h: Linear(1024, 512)-BN-ReLU-Linear(512, 1024).
    (B, d) -> (z = g(x), p = h(z)), both (B, 1024).
    """

    bn_groups: int = 1
    dim: int = 1024
    hidden: int = 512

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(h, name):
            return GroupBatchNorm(self.bn_groups, name=name)(h, train=train)

        z = nn.relu(bn(_dense(self.dim, ("embed", "mlp"), name="proj_1")(x), "proj_bn_1"))
        z = nn.relu(bn(_dense(self.dim, ("mlp", None), name="proj_2")(z), "proj_bn_2"))
        z = bn(_dense(self.dim, (None, "mlp"), name="proj_3")(z), "proj_bn_3")
        p = nn.relu(bn(_dense(self.hidden, ("mlp", None), name="pred_1")(z), "pred_bn_1"))
        p = _dense(self.dim, (None, "mlp"), name="pred_2")(p)
        return z, p


class MaskedLMHead(nn.Module):
    """DeCLIP's text self-supervision head: Linear(width -> vocab) on final-LN token states.

    Scores only `max_masked` positions per caption (the first masked ones), so the logits are
    (B, max_masked, vocab) rather than (B, L, vocab): 77 × 49,408 floats a caption otherwise.
    Returns (logits, labels) with labels 0 at padding slots (rows with fewer masked tokens).
    """

    vocab_size: int
    max_masked: int

    @nn.compact
    def __call__(self, states, labels):
        length = labels.shape[1]
        # The first `max_masked` masked positions: masked ones rank by position, others last.
        rank = jnp.where(labels != 0, length - jnp.arange(length), 0)
        _, positions = jax.lax.top_k(rank, self.max_masked)
        picked_states = jnp.take_along_axis(states, positions[..., None], axis=1)
        picked_labels = jnp.take_along_axis(labels, positions, axis=1)
        logits = _dense(self.vocab_size, ("embed", "vocab"), name="decoder")(picked_states)
        return logits, picked_labels


class SimClrHead(nn.Module):
    """SLIP's SimCLR head on the image tower's pooled feature:
    Linear(d, width)-BN-ReLU-Linear(width, width)-BN-ReLU-Linear(width, dim), no BN on the
    output; (B, d) -> (B, dim), unnormalised. BatchNorm statistics per group of the batch
    (`bn_groups`, as `GroupBatchNorm`)."""

    bn_groups: int = 1
    width: int = 4096
    dim: int = 256

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(h, name):
            return GroupBatchNorm(self.bn_groups, name=name)(h, train=train)

        h = nn.relu(bn(_dense(self.width, ("embed", "mlp"), name="fc_1")(x), "bn_1"))
        h = nn.relu(bn(_dense(self.width, ("mlp", None), name="fc_2")(h), "bn_2"))
        return _dense(self.dim, (None, "joint"), name="fc_3")(h)


class TokenHeads(nn.Module):
    """FILIP's token mappings and scale: image patch tokens (B, P, d_v) and caption token states
    (B, L, d_t) each through its own Linear to `dim`, L2-normalised per token; and θ_dense
    (`log_scale`), the log of the token-wise logit scale (initialised ln(1/0.07), as CLIP's)."""

    dim: int = 256

    def setup(self):
        self.image_mapping = _dense(self.dim, ("embed", "joint"))
        self.text_mapping = _dense(self.dim, ("embed", "joint"))
        self.log_scale = self.param(
            "log_scale",
            nn.with_logical_partitioning(nn.initializers.constant(math.log(1 / 0.07)), ()),
            (),
        )

    def image(self, tokens):
        """(B, P, d_v) -> (B, P, dim) unit tokens."""
        return _unit(self.image_mapping(tokens))

    def text(self, tokens):
        """(B, L, d_t) -> (B, L, dim) unit tokens."""
        return _unit(self.text_mapping(tokens))

    def __call__(self, image_tokens, text_tokens):
        return self.image(image_tokens), self.text(text_tokens), self.log_scale


def _unit(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True))
