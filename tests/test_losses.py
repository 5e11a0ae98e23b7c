"""Losses against an independent float64 numpy reference, on one and on 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import losses, sharding


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def clip_reference(u, v, s):
    """Value and analytic gradients of ½[CE(s·UVᵀ) + CE(s·VUᵀ)], float64 numpy."""
    u, v = u.astype(np.float64), v.astype(np.float64)
    n = len(u)
    eye = np.eye(n)
    sim = u @ v.T
    lp_i2t, lp_t2i = _log_softmax(s * sim), _log_softmax(s * sim.T)
    value = -0.5 * (np.trace(lp_i2t) + np.trace(lp_t2i)) / n
    d_i2t = (np.exp(lp_i2t) - eye) / n  # dCE/dlogits, rows = images
    d_t2i = (np.exp(lp_t2i) - eye) / n  # rows = texts
    grad_u = 0.5 * s * (d_i2t @ v + d_t2i.T @ v)
    grad_v = 0.5 * s * (d_i2t.T @ u + d_t2i @ u)
    grad_s = 0.5 * ((d_i2t * sim).sum() + (d_t2i * sim.T).sum())
    return value, (grad_u, grad_v, grad_s)


def _embeddings(batch=32, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(2, batch, dim)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return u, v, np.float32(7.5)


def _assert_matches(value, grads, reference, tol=1e-5):
    ref_value, ref_grads = reference
    np.testing.assert_allclose(value, ref_value, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_clip_loss_single_device_matches_numpy():
    u, v, s = _embeddings()
    value, grads = jax.value_and_grad(losses.clip_loss, argnums=(0, 1, 2))(u, v, s)
    _assert_matches(value, grads, clip_reference(u, v, s))


@pytest.mark.parametrize(
    "mesh_shape",
    [
        {"data": 8, "fsdp": 1, "model": 1},
        {"data": 4, "fsdp": 2, "model": 1},
        {"data": 2, "fsdp": 2, "model": 2},
    ],
)
def test_clip_loss_sharded_matches_numpy(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    u, v, s = _embeddings()
    loss = losses.on_batch_shards(losses.clip_loss, mesh, num_batched=2)
    u_sharded, v_sharded = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v))
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(u_sharded, v_sharded, s)
    _assert_matches(value, grads, clip_reference(u, v, s))
    # The gradient keeps the batch sharding of the embeddings.
    assert grads[0].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)


def test_clip_loss_pmap_runs_the_same_body():
    u, v, s = _embeddings()
    n = jax.device_count()
    split = lambda x: x.reshape(n, -1, x.shape[-1])  # noqa: E731

    def per_device(u, v, s):
        return jax.value_and_grad(
            functools.partial(losses.clip_loss, axis_name="batch"), argnums=(0, 1, 2)
        )(u, v, s)

    value, (gu, gv, gs) = jax.pmap(per_device, axis_name="batch", in_axes=(0, 0, None))(
        split(u), split(v), s
    )
    ref_value, (ref_u, ref_v, ref_s) = clip_reference(u, v, s)
    np.testing.assert_allclose(value, np.full(n, ref_value), rtol=1e-5)
    # pmap transposes the loss's pmean into a psum, so each device's gradient is n times its
    # share: slices divide by n, and the replicated scale takes the usual cross-device mean.
    np.testing.assert_allclose(gu.reshape(u.shape) / n, ref_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gv.reshape(v.shape) / n, ref_v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.mean(gs), ref_s, rtol=1e-5)


def test_clip_loss_builds_only_local_rows():
    """Each device's logits are (B/devices, B): no (B, B) matrix exists on any device."""
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    u, v, s = _embeddings(batch=64)
    loss = jax.jit(losses.on_batch_shards(losses.clip_loss, mesh, num_batched=2))
    hlo = (
        loss.lower(*(jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v)), s)
        .compile()
        .as_text()
    )
    assert "f32[8,64]" in hlo
    assert "f32[64,64]" not in hlo
