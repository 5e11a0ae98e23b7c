"""The pre-LayerNorm transformer shared by the image and the text towers (CLIP/open_clip shape).

Every parameter carries logical axis names ("embed", "mlp", "heads", "kv"); `clipjax/sharding.py`
maps them onto the mesh.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import precision

LN_EPS = 1e-5  # CLIP's LayerNorm epsilon (Flax defaults to 1e-6)

ACTIVATION_AXES = ("batch", "length", "embed")
DENSE_INIT = nn.initializers.xavier_uniform()
# Xavier over the fused head axes, as for a (width, heads * head_dim) matrix.
QKV_INIT = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
OUT_INIT = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)


def layer_norm(name: str) -> nn.LayerNorm:
    """CLIP's LayerNorm, in float32 whatever the compute dtype (the precision policy)."""
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class Linear(nn.Module):
    """`einsum(spec, activation(x), kernel) + bias` under the precision policy
    (`precision.einsum`; `activation` elementwise, or None).

    The kernel keeps its full `shape` from init on, so its logical `axes` name the array as
    created. The bias spans the kernel's axes that the output keeps, in the kernel's order.
    """

    spec: str  # e.g. "BLW,WHD->BHLD": input, kernel and output indices
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = DENSE_INIT
    dtype: jnp.dtype = jnp.float32
    activation: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes), self.shape
        )
        y = precision.einsum(self.spec, x, kernel, self.dtype, self.activation)
        if not self.use_bias:
            return y
        indices, out = self.spec.split("->")
        kernel_indices = indices.split(",")[1]
        kept = [i for i, index in enumerate(kernel_indices) if index in out]
        if sorted(kept, key=lambda i: out.index(kernel_indices[i])) != kept:
            raise ValueError(f"{self.spec!r}: the output must keep the kernel's axes in order.")
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.axes[i] for i in kept)),
            tuple(self.shape[i] for i in kept),
        )
        sizes = {kernel_indices[i]: self.shape[i] for i in kept}
        return y + bias.reshape([sizes.get(index, 1) for index in out])


# model.attention: "cudnn" is cuDNN's fused kernel, "xla" XLA's composition (`lean_attention`),
# "auto" the first where it applies (a GPU, 16-bit operands) and the second elsewhere.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# cuDNN's fused kernel refuses odd sequence lengths in training (77 text tokens, 197 for B/16):
# `attend` pads to a multiple of this and masks the padding with the sequence-length arguments.
CUDNN_LENGTH_MULTIPLE = 8
# Head dims cuDNN's fused kernel takes on every GPU it supports (Hopper also takes up to 256).
CUDNN_MAX_HEAD_DIM = 128
FLOAT32_MIN = float(jnp.finfo(jnp.float32).min)  # the causal mask's logit


def choose_attention(
    implementation: str, dtype, platform: str, head_dims: tuple[int, ...] = ()
) -> str:
    """The kernel `implementation` ("auto", "xla" or "cudnn") comes to for a program compiled
    for devices of `platform` ("gpu"/"cuda", "tpu", "cpu"): "auto" is "cudnn" on a GPU with
    16-bit operands and head dims cuDNN takes (`head_dims`), else "xla"."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention={implementation!r} is unknown; use one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )
    if implementation != "auto":
        return implementation
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    head_dims_ok = all(d % 8 == 0 and d <= CUDNN_MAX_HEAD_DIM for d in head_dims)
    return "cudnn" if platform in ("gpu", "cuda") and sixteen_bit and head_dims_ok else "xla"


def padded_attention(query, key, value, *, causal: bool, implementation: str, multiple: int):
    """`jax.nn.dot_product_attention` with the sequence padded to a multiple of `multiple`: the
    padded keys are masked by `key_value_seq_lengths` (and the padded queries by
    `query_seq_lengths`), and the padded rows are dropped from the output, so the result and
    its gradients are those of the unpadded call. (B, L, heads, head_dim) each."""
    batch, length = query.shape[:2]
    padded = -(-length // multiple) * multiple
    if padded == length:
        return jax.nn.dot_product_attention(
            query, key, value, is_causal=causal, implementation=implementation
        )
    widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    lengths = jnp.full((batch,), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        *(jnp.pad(x, widths) for x in (query, key, value)),
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :length]


def _attention_logits(query, key, causal: bool):
    """Scaled logits (B, heads, T, S) in float32, products in the operands' dtype; a causal
    mask sets the future to float32's lowest value."""
    logits = jnp.einsum("BTNH,BSNH->BNTS", query, key, preferred_element_type=jnp.float32)
    logits *= query.shape[-1] ** -0.5
    if causal:
        length = query.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, FLOAT32_MIN)
    return logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lean_attention(query, key, value, causal: bool):
    """XLA's attention that keeps no (B, heads, T, S) array from the forward pass to the
    backward one: only q, k, v and the softmax's log-sum-exp, as flash attention does; the
    backward pass computes the logits again (one more T × S product per layer). JAX's
    composition keeps its softmax's float32 output for the backward pass, and with 16-bit
    operands a 16-bit copy for the second product: for ViT-B/16, 12 × 197² floats per layer and
    example (docs/benchmarks.md measures the step's peak memory with this and without).
    (B, T, heads, head_dim) each -> (B, T, heads, head_dim)."""
    return _lean_forward(query, key, value, causal)[0]


def _lean_forward(query, key, value, causal):
    logits = _attention_logits(query, key, causal)
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - log_norm).astype(value.dtype)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, value, preferred_element_type=jnp.float32)
    return out.astype(query.dtype), (query, key, value, log_norm)


def _lean_backward(causal, residuals, d_out):
    query, key, value, log_norm = residuals
    dtype = query.dtype
    # The barrier, which takes the cotangent too, keeps XLA from merging the product below
    # with the forward pass's identical one (common-subexpression elimination, as
    # `jax.checkpoint`'s `prevent_cse` guards against) and from computing it before this
    # layer's backward pass: either would keep (B, heads, T, S) logits alive for many layers.
    query, key, log_norm, d_out = jax.lax.optimization_barrier((query, key, log_norm, d_out))
    probs = jnp.exp(_attention_logits(query, key, causal) - log_norm)  # float32
    d_out = d_out.astype(dtype)
    d_value = jnp.einsum(
        "BNTS,BTNH->BSNH", probs.astype(dtype), d_out, preferred_element_type=jnp.float32
    )
    d_probs = jnp.einsum("BTNH,BSNH->BNTS", d_out, value, preferred_element_type=jnp.float32)
    # The softmax's backward, then the logits' scale.
    d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_logits = (d_logits * query.shape[-1] ** -0.5).astype(dtype)
    d_query = jnp.einsum("BNTS,BSNH->BTNH", d_logits, key, preferred_element_type=jnp.float32)
    d_key = jnp.einsum("BNTS,BTNH->BSNH", d_logits, query, preferred_element_type=jnp.float32)
    return d_query.astype(dtype), d_key.astype(dtype), d_value.astype(value.dtype)


lean_attention.defvjp(_lean_forward, _lean_backward)


def attend(query, key, value, *, causal: bool, implementation: str = "auto"):
    """Scaled dot-product attention, (B, L, heads, head_dim) each -> (B, L, heads, head_dim).
    "cudnn" is cuDNN's fused flash attention (`jax.nn.dot_product_attention`), on operands
    padded to a length it takes (`padded_attention`); "xla" is `lean_attention`, compiled by
    XLA. "auto" is resolved by `step.build` from the platform of the mesh it compiles for
    (`choose_attention`); left to this function (a program with no mesh, such as
    `clipjax.load`'s encoders), it picks by the default backend and falls back to XLA where
    cuDNN refuses. The softmax and its statistics are float32 on every path, the products take
    the operands' dtype; `causal` lets position t see positions <= t only."""
    head_dim = query.shape[-1]
    impl = choose_attention(implementation, query.dtype, jax.default_backend(), (head_dim,))
    if impl == "cudnn":
        try:
            return padded_attention(
                query,
                key,
                value,
                causal=causal,
                implementation="cudnn",
                multiple=CUDNN_LENGTH_MULTIPLE,
            )
        except (NotImplementedError, ValueError, RuntimeError):  # no cuDNN, or a GPU it refuses
            if implementation != "auto":
                raise
    return lean_attention(query, key, value, causal)


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v/out biases: (B, L, W) -> (B, L, W).

    The four projections follow the precision policy; the attention itself is `attend` on
    operands cast to the compute dtype, so with bfloat16 both of its products take bfloat16
    operands, its softmax is float32, and its output is bfloat16 (the out projection's operand
    dtype in any case).
    """

    heads: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"Width {width} is not divisible by {self.heads} attention heads.")
        head_dim = width // self.heads

        def project(name):  # (B, L, W) -> (B, L, heads, head_dim), in the compute dtype
            return Linear(
                "BLW,WHD->BLHD",
                (width, self.heads, head_dim),
                ("embed", "heads", "kv"),
                kernel_init=QKV_INIT,
                dtype=self.dtype,
                name=name,
            )(x).astype(self.dtype)

        out = attend(
            project("query"),
            project("key"),
            project("value"),
            causal=self.causal,
            implementation=self.implementation,
        )
        return Linear(
            "BLHD,HDW->BLW",
            (self.heads, head_dim, width),
            ("heads", "kv", "embed"),
            kernel_init=OUT_INIT,
            dtype=self.dtype,
            name="out",
        )(out)


def gelu(x):
    """Exact GELU, x · Φ(x) = ½x(1 + erf(x/√2)), as torch's (open_clip's) default. Through erf:
    `jax.nn.gelu`'s erfc form costs about twice as much on CPU, for accuracy only at x ≪ 0,
    where both are ~0 (the largest difference is about 1e-6)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.5**0.5))


def quick_gelu(x):
    """x · σ(1.702 x): the GELU approximation OpenAI's CLIP models were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Linear(mlp_dim) -> GELU -> Linear(width), with biases: (B, L, W) -> (B, L, W).

    GELU is exact (torch's, as open_clip uses) or, with `quick_gelu`, OpenAI's approximation.
    fc_out applies it (`Linear.activation`), so that under the precision policy the backward
    pass keeps only GELU's bfloat16 input.
    """

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    quick_gelu: bool = False

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = Linear(
            "BLW,WM->BLM", (width, self.mlp_dim), ("embed", "mlp"), dtype=self.dtype, name="fc_in"
        )(x)
        return Linear(
            "BLM,MW->BLW",
            (self.mlp_dim, width),
            ("mlp", "embed"),
            dtype=self.dtype,
            activation=quick_gelu if self.quick_gelu else gelu,
            name="fc_out",
        )(x)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x)). (B, L, W) -> (B, L, W)."""

    heads: int
    mlp_dim: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    quick_gelu: bool = False
    attention: str = "auto"  # ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.heads, self.causal, self.dtype, self.attention, name="attn")(
            layer_norm("ln_attn")(x)
        )
        mlp = Mlp(self.mlp_dim, self.dtype, self.quick_gelu, name="mlp")
        x = x + mlp(layer_norm("ln_mlp")(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


# model.remat -> what the backward pass keeps of a block's forward (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # keep everything: no recomputation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmuls
}


def _block_step(block, x, _):
    """One scan step: the carry goes through this layer's block."""
    return block(x), None


class Transformer(nn.Module):
    """`depth` pre-LN blocks: (B, L, W) -> (B, L, W).

    The blocks are named block_00, block_01, ..., or with `scan` one `blocks` module whose
    parameters have a leading depth axis, applied by `nn.scan` (one block is compiled, not
    `depth`). `remat` names a policy of REMAT_POLICIES for what the backward pass keeps, and
    `attention` an implementation of ATTENTION_IMPLEMENTATIONS.
    """

    depth: int
    heads: int
    mlp_dim: int
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    quick_gelu: bool = False
    scan: bool = False
    remat: str = "none"
    attention: str = "auto"  # ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat={self.remat!r} is unknown; use one of {', '.join(REMAT_POLICIES)}."
            )
        block = Block
        if self.remat != "none":
            # Inside a scan, common subexpressions cannot merge across steps: no need to guard.
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        args = (self.heads, self.mlp_dim, self.causal, self.dtype, self.quick_gelu, self.attention)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        if self.scan:
            layers = nn.scan(
                _block_step,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.depth,
                # The depth axis of every parameter is not sharded.
                metadata_params={nn.PARTITION_NAME: None},
            )
            x, _ = layers(block(*args, name="blocks"), x, None)
            return x
        for i in range(self.depth):
            x = block(*args, name=f"block_{i:02d}")(x)
        return x


@dataclasses.dataclass(frozen=True)
class TowerOptions:
    """How both transformer towers compute (`config.model`): the compute `dtype`, OpenAI's
    `quick_gelu`, `scan_layers` and `remat` (the Transformer's `scan` and `remat`), and the
    `attention` kernel."""

    dtype: Any = jnp.float32
    quick_gelu: bool = False
    scan_layers: bool = False
    remat: str = "none"  # REMAT_POLICIES
    attention: str = "auto"  # ATTENTION_IMPLEMENTATIONS


def tower_transformer(options: TowerOptions, depth: int, heads: int, mlp_dim: int, *, causal=False):
    """A tower's `transformer`, built inside its compact `__call__` under `options`."""
    return Transformer(
        depth,
        heads,
        mlp_dim,
        causal=causal,
        dtype=options.dtype,
        quick_gelu=options.quick_gelu,
        scan=options.scan_layers,
        remat=options.remat,
        attention=options.attention,
        name="transformer",
    )
