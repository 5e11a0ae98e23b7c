"""The mixed-precision policy: narrow operands, float32 accumulation, in both passes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.models import layers, precision

SPECS = {  # spec -> operand shapes: every product form the towers use
    "BLW,WM->BLM": ((2, 5, 8), (8, 6)),
    "BLW,WHD->BHLD": ((2, 5, 8), (8, 2, 3)),
    "BHTD,BHSD->BHTS": ((2, 2, 5, 3), (2, 2, 4, 3)),
    "BHTS,BHSD->BHTD": ((2, 2, 5, 4), (2, 2, 4, 3)),
    "BHLD,HDW->BLW": ((2, 2, 5, 3), (2, 3, 8)),
    "bhpwqc,pqcd->bhwd": ((2, 2, 3, 2, 3, 3), (3, 3, 3, 4)),
}


def _operands(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _round(x):
    """x rounded to bfloat16, in float64."""
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("spec", SPECS)
def test_mixed_products_and_their_gradients_equal_float64_on_rounded_operands(spec):
    """Value = the float64 product of the bfloat16-rounded operands (accumulation in float32,
    no rounding of the result); the gradients are the float64 products of the rounded
    cotangent with the rounded operands."""
    lhs, rhs = _operands(SPECS[spec])
    out, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b, jnp.bfloat16), lhs, rhs)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.einsum(spec, _round(lhs), _round(rhs)), rtol=1e-5, atol=1e-5)
    cotangent = _operands([out.shape], seed=1)[0]
    d_lhs, d_rhs = vjp(cotangent)
    lhs_spec, rhs_spec = precision._transposed_specs(spec)
    want_lhs = np.einsum(lhs_spec, _round(cotangent), _round(rhs))
    want_rhs = np.einsum(rhs_spec, _round(lhs), _round(cotangent))
    assert d_lhs.dtype == d_rhs.dtype == jnp.float32
    np.testing.assert_allclose(d_lhs, want_lhs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_rhs, want_rhs, rtol=1e-5, atol=1e-5)
    # And they differ from the float32 product: the operands were rounded.
    assert np.abs(np.asarray(out) - np.einsum(spec, lhs, rhs)).max() > 1e-4


def _gelu64(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gelu64_slope(x):
    density = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2))) + x * density


def test_an_activated_product_keeps_its_narrow_input_and_equals_float64():
    """`einsum(spec, lhs, rhs, bfloat16, activation=gelu)`: GELU of the bfloat16-rounded input,
    rounded again as the product's operand, in both passes; the input's gradient is GELU's
    slope there times the product's gradient."""
    spec = "BLM,MW->BLW"
    lhs, rhs = _operands([(2, 5, 6), (6, 8)])
    out, vjp = jax.vjp(
        lambda a, b: precision.einsum(spec, a, b, jnp.bfloat16, activation=layers.gelu), lhs, rhs
    )
    hidden = _round(_gelu64(_round(lhs)))
    np.testing.assert_allclose(out, np.einsum(spec, hidden, _round(rhs)), rtol=1e-5, atol=1e-5)
    cotangent = _operands([out.shape], seed=1)[0]
    d_lhs, d_rhs = vjp(cotangent)
    lhs_spec, rhs_spec = precision._transposed_specs(spec)
    d_hidden = np.einsum(lhs_spec, _round(cotangent), _round(rhs))
    np.testing.assert_allclose(d_lhs, d_hidden * _gelu64_slope(_round(lhs)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        d_rhs, np.einsum(rhs_spec, hidden, _round(cotangent)), rtol=1e-5, atol=1e-5
    )
    # In float32 it is the plain product of the activation.
    np.testing.assert_allclose(
        precision.einsum(spec, lhs, rhs, jnp.float32, activation=layers.gelu),
        np.einsum(spec, _gelu64(lhs.astype(np.float64)), rhs),
        rtol=1e-5,
        atol=1e-5,
    )


def test_float32_is_the_plain_einsum():
    lhs, rhs = _operands(SPECS["BLW,WM->BLM"])
    np.testing.assert_array_equal(
        precision.einsum("BLW,WM->BLM", lhs, rhs, jnp.float32), jnp.einsum("BLW,WM->BLM", lhs, rhs)
    )


def test_backward_products_take_narrow_operands():
    """In the compiled gradient, every product of the policy reads bfloat16 operands."""
    lhs, rhs = _operands(SPECS["BLW,WM->BLM"])
    grad = jax.jit(
        jax.grad(
            lambda a, b: jnp.sum(precision.einsum("BLW,WM->BLM", a, b, "bfloat16") ** 2),
            argnums=(0, 1),
        )
    )
    hlo = grad.lower(lhs, rhs).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line and "=" in line]
    assert len(dots) == 3  # the forward product and the two of the backward pass
    assert all("bf16" in line.split("dot_general")[1] for line in dots), dots


def test_an_index_summed_within_one_operand_is_refused():
    with pytest.raises(ValueError, match="summed within it"):
        precision.einsum("ij,jk->k", *_operands([(2, 3), (3, 4)]), jnp.bfloat16)
