"""The mixed-precision policy of the towers: where `model.dtype` applies, and how.

Parameters are float32 always. With a compute dtype narrower than float32 (`bfloat16`), every
product of the transformers (projections, attention, MLPs, the patch embedding) takes its
operands in that dtype and accumulates and returns float32, in the forward pass and in both
products of the backward pass. Everything else (LayerNorm, softmax, residual sums, BatchNorm
statistics, the joint-space projections and every loss) stays float32. This is what bfloat16
hardware does at full rate: here bfloat16 × bfloat16 → float32 matmuls run at about 1.6× the
float32 rate, while bfloat16 results or mixed-dtype products run at the float32 rate or below.
The MLPs' GELU is computed in float32 from its bfloat16-rounded input, the operand its product
keeps anyway, so that the backward pass keeps 2 bytes per hidden value rather than 6.

With `float32` the products are plain `jnp.einsum`, unchanged.
"""

import functools

import jax
import jax.numpy as jnp

FLOAT32 = jnp.dtype(jnp.float32)


def _transposed_specs(spec: str) -> tuple[str, str]:
    """The einsum specs of the two cotangent products of `spec` ("a,b->c"): c,b->a and a,c->b.

    Valid when every index of an operand appears in the other operand or in the output, which
    holds for matmul-like products (no index summed within one operand alone)."""
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    for name, operand, other in (("first", lhs, rhs), ("second", rhs, lhs)):
        alone = set(operand) - set(other) - set(out) - {"."}
        if alone:
            raise ValueError(
                f"einsum {spec!r}: index {sorted(alone)} of the {name} operand "
                "is summed within it; mixed precision needs matmul-like products."
            )
    return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixed_einsum(spec: str, dtype, activation, lhs, rhs):
    return _mixed_forward(spec, dtype, activation, lhs, rhs)[0]


def _mixed_forward(spec, dtype, activation, lhs, rhs):
    # The residuals: the activation's input kept narrow, and the weight as it is (float32): it
    # stays alive as a parameter anyway, where a narrow copy of every weight would be kept from
    # the forward pass to the backward one (2 bytes per parameter per device).
    narrow = lhs.astype(dtype)
    operand = narrow if activation is None else activation(narrow.astype(FLOAT32)).astype(dtype)
    out = jnp.einsum(spec, operand, rhs.astype(dtype), preferred_element_type=FLOAT32)
    return out, (narrow, rhs)


def _mixed_backward(spec, dtype, activation, residuals, cotangent):
    # The barrier, which takes the cotangent too, keeps XLA from merging what is computed
    # again here (the weight's narrow copy, the activation) with the forward pass's identical
    # values (common-subexpression elimination) and from computing it before this layer's
    # backward pass: either would keep it alive across many layers.
    (lhs, rhs), cotangent = jax.lax.optimization_barrier((residuals, cotangent))
    rhs = rhs.astype(dtype)
    lhs_spec, rhs_spec = _transposed_specs(spec)
    cotangent = cotangent.astype(dtype)
    d_operand = jnp.einsum(lhs_spec, cotangent, rhs, preferred_element_type=FLOAT32)
    if activation is None:
        operand, d_lhs = lhs, d_operand
    else:
        post, activation_vjp = jax.vjp(activation, lhs.astype(FLOAT32))
        operand, (d_lhs,) = post.astype(dtype), activation_vjp(d_operand)
    d_rhs = jnp.einsum(rhs_spec, operand, cotangent, preferred_element_type=FLOAT32)
    return d_lhs, d_rhs


_mixed_einsum.defvjp(_mixed_forward, _mixed_backward)


def einsum(spec: str, lhs: jax.Array, rhs: jax.Array, dtype, activation=None) -> jax.Array:
    """`jnp.einsum(spec, activation(lhs), rhs)` under the policy (`activation`: elementwise, or
    None for none): plain for float32; else operands cast to `dtype`, accumulated and returned
    in float32, with the backward products the same way. `lhs` is the layer's input and `rhs`
    the weight: the backward pass keeps a narrow copy of the first and casts the second again.
    With `activation`, it is applied to the narrow `lhs` (in float32) in both passes, so that
    only that narrow input is kept for the backward pass, which computes the activation again
    (an MLP's hidden layer: 2 bytes per value kept where its float32 input and narrow output
    would take 6)."""
    dtype = jnp.dtype(dtype)
    if dtype == FLOAT32:
        return jnp.einsum(spec, lhs if activation is None else activation(lhs), rhs)
    _transposed_specs(spec)  # checked at trace time
    return _mixed_einsum(spec, dtype, activation, lhs.astype(FLOAT32), rhs.astype(FLOAT32))
