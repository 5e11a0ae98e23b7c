"""Objective heads: grouped BatchNorm statistics against numpy, the masked-LM position picker."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models.heads import GroupBatchNorm, MaskedLMHead


def test_group_batch_norm_uses_per_group_statistics():
    x = np.random.default_rng(0).normal(size=(8, 3)) * [1.0, 2.0, 3.0] + [0.0, 1.0, -1.0]
    x = x.astype(np.float32)
    bn = GroupBatchNorm(groups=4, use_affine=False)
    variables = bn.init(jax.random.PRNGKey(0), x, train=True)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    groups = x.astype(np.float64).reshape(4, 2, 3)
    mean, var = groups.mean(axis=1, keepdims=True), groups.var(axis=1, keepdims=True)
    expected = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(8, 3)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var.mean(axis=(0, 1)), rtol=1e-5)
    # One group is the whole batch: synchronised statistics.
    synced = GroupBatchNorm(groups=1, use_affine=False)
    y1, _ = synced.apply(variables, x, train=True, mutable=["batch_stats"])
    whole = x.astype(np.float64)
    np.testing.assert_allclose(
        y1, (whole - whole.mean(0)) / np.sqrt(whole.var(0) + 1e-5), rtol=1e-4, atol=1e-4
    )


def test_masked_lm_head_scores_the_first_masked_positions():
    labels = np.array([[0, 7, 0, 9, 0, 5], [0, 0, 0, 0, 0, 0]], np.int32)
    states = jnp.arange(2 * 6 * 4, dtype=jnp.float32).reshape(2, 6, 4)
    head = MaskedLMHead(vocab_size=11, max_masked=2)
    variables = head.init(jax.random.PRNGKey(0), states, labels)
    logits, picked = head.apply(variables, states, labels)
    assert logits.shape == (2, 2, 11)
    np.testing.assert_array_equal(picked[0], [7, 9])  # positions 1 and 3, in order
    np.testing.assert_array_equal(picked[1], [0, 0])  # nothing masked: padding slots
    kernel = nn.unbox(variables)["params"]["decoder"]["kernel"]
    np.testing.assert_allclose(logits[0, 1], states[0, 3] @ kernel + 0.0, rtol=1e-5)
