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


CLIP_BODIES = [losses.clip_loss, losses.clip_loss_ring]


@pytest.mark.parametrize("body", CLIP_BODIES)
def test_clip_loss_single_device_matches_numpy(body):
    u, v, s = _embeddings()
    value, grads = jax.value_and_grad(body, argnums=(0, 1, 2))(u, v, s)
    _assert_matches(value, grads, clip_reference(u, v, s))


@pytest.mark.parametrize(
    "mesh_shape",
    [
        {"data": 8, "fsdp": 1, "model": 1},
        {"data": 4, "fsdp": 2, "model": 1},
        {"data": 2, "fsdp": 2, "model": 2},
    ],
)
@pytest.mark.parametrize("body", CLIP_BODIES)
def test_clip_loss_sharded_matches_numpy(mesh_shape, body):
    mesh = sharding.make_mesh(mesh_shape)
    u, v, s = _embeddings()
    loss = losses.on_batch_shards(body, mesh, num_batched=2)
    u_sharded, v_sharded = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v))
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(u_sharded, v_sharded, s)
    _assert_matches(value, grads, clip_reference(u, v, s))
    # The gradient keeps the batch sharding of the embeddings.
    assert grads[0].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)


@pytest.mark.parametrize("body", CLIP_BODIES)
def test_clip_loss_pmap_runs_the_same_body(body):
    u, v, s = _embeddings()
    n = jax.device_count()
    split = lambda x: x.reshape(n, -1, x.shape[-1])  # noqa: E731

    def per_device(u, v, s):
        return jax.value_and_grad(functools.partial(body, axis_name="batch"), argnums=(0, 1, 2))(
            u, v, s
        )

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


@pytest.mark.parametrize("body", [losses.clip_loss_ring, losses.info_nce_ring])
def test_infonce_ring_builds_only_local_blocks(body):
    """Forward and backward of the ring forms hold (B/k, B/k) logits, never (B/k, B), and
    gather nothing: chunks move with collective permutes."""
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    u, v, s = _embeddings(batch=64)
    loss = losses.on_batch_shards(body, mesh, num_batched=2)
    embeds = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v)]
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*embeds, s).compile()
    hlo = hlo.as_text()
    assert "f32[8,8]" in hlo
    assert "f32[8,64]" not in hlo
    assert "f32[64,64]" not in hlo
    assert "all-gather" not in hlo
    assert "collective-permute" in hlo


MESH_SHAPES = [
    {"data": 8, "fsdp": 1, "model": 1},
    {"data": 4, "fsdp": 2, "model": 1},
    {"data": 2, "fsdp": 2, "model": 2},
]


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid_reference(u, v, t, b):
    """Value, analytic gradients (u, v, t, b) and logit means of the SigLIP loss, float64."""
    u, v, t, b = u.astype(np.float64), v.astype(np.float64), np.float64(t), np.float64(b)
    n = len(u)
    eye = np.eye(n, dtype=bool)
    sim = u @ v.T
    logits = t * sim + b
    signs = np.where(eye, 1.0, -1.0)
    value = _softplus(-signs * logits).sum() / n
    d_logits = -signs * _sigmoid(-signs * logits) / n
    grads = (t * d_logits @ v, t * d_logits.T @ u, (d_logits * sim).sum(), d_logits.sum())
    metrics = {"pos_logit_mean": logits[eye].mean(), "neg_logit_mean": logits[~eye].mean()}
    return value, grads, metrics


def jsd_reference(u, v, t, groups=1):
    """Value, analytic gradients (u, v, t) and critic means of CLIP-Lite's JSD loss, float64.

    The batch is cut into `groups` equal consecutive slices (one per device); each image's
    negative is the next caption of its own slice, cyclically.
    """
    u, v, t = u.astype(np.float64), v.astype(np.float64), np.float64(t)
    n = len(u)
    local = n // groups
    i = np.arange(n)
    negative = (i // local) * local + (i % local + 1) % local
    sim_pos, sim_neg = (u * v).sum(1), (u * v[negative]).sum(1)
    pos, neg = t * sim_pos, t * sim_neg
    value = _softplus(-pos).mean() + _softplus(neg).mean()
    d_pos, d_neg = -_sigmoid(-pos) / n, _sigmoid(neg) / n
    grad_u = t * (d_pos[:, None] * v + d_neg[:, None] * v[negative])
    grad_v = t * d_pos[:, None] * u
    np.add.at(grad_v, negative, t * d_neg[:, None] * u)
    grad_t = d_pos @ sim_pos + d_neg @ sim_neg
    return value, (grad_u, grad_v, grad_t), {"critic_pos": pos.mean(), "critic_neg": neg.mean()}


def prior_reference(real, prior):
    """Value and analytic gradients of −(mean log σ(prior) + mean log(1 − σ(real))), float64."""
    real, prior = real.astype(np.float64), prior.astype(np.float64)
    value = _softplus(-prior).mean() + _softplus(real).mean()
    return value, (_sigmoid(real) / real.size, -_sigmoid(-prior) / prior.size)


def _finite_difference(f, args, eps=1e-6):
    """Central differences of the scalar f(*args) with respect to every float64 argument."""
    grads = []
    for k, arg in enumerate(args):
        arg = np.asarray(arg, np.float64)
        grad = np.zeros_like(arg)
        for index in np.ndindex(arg.shape):
            shifted = []
            for step in (eps, -eps):
                moved = arg.copy()
                moved[index] += step
                shifted.append(f(*args[:k], moved, *args[k + 1 :]))
            grad[index] = (shifted[0] - shifted[1]) / (2 * eps)
        grads.append(grad)
    return grads


def test_references_match_finite_differences():
    """The analytic numpy gradients that the JAX losses are checked against are themselves right."""
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(2, 6, 3))
    args = (u, v, 2.5, -1.5)
    for got, want in zip(
        sigmoid_reference(*args)[1],
        _finite_difference(lambda *a: sigmoid_reference(*a)[0], args),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    for got, want in zip(
        jsd_reference(u, v, 2.5, groups=2)[1],
        _finite_difference(lambda *a: jsd_reference(*a, groups=2)[0], (u, v, 2.5)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    real, prior = rng.normal(size=(2, 5, 1)) * 3
    for got, want in zip(
        prior_reference(real, prior)[1],
        _finite_difference(lambda *a: prior_reference(*a)[0], (real, prior)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def _sigmoid_inputs(batch=32):
    u, v, _ = _embeddings(batch=batch, seed=2)
    return u, v, np.float32(6.0), np.float32(-3.0)


def _assert_metrics(metrics, ref_metrics, tol=1e-5):
    assert set(metrics) == set(ref_metrics)
    for name, want in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], want, rtol=tol, atol=tol, err_msg=name)


def test_sigmoid_loss_single_device_matches_numpy():
    args = _sigmoid_inputs()
    (value, metrics), grads = jax.value_and_grad(
        losses.sigmoid_loss, argnums=(0, 1, 2, 3), has_aux=True
    )(*args)
    ref_value, ref_grads, ref_metrics = sigmoid_reference(*args)
    _assert_matches(value, grads, (ref_value, ref_grads))
    _assert_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_sigmoid_loss_sharded_and_ring_match_numpy(mesh_shape):
    """Unchunked and ring forms on 8 devices: both equal the reference and each other."""
    mesh = sharding.make_mesh(mesh_shape)
    u, v, t, b = _sigmoid_inputs()
    embeds = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v)]
    ref_value, ref_grads, ref_metrics = sigmoid_reference(u, v, t, b)
    results = []
    for body in (losses.sigmoid_loss, losses.sigmoid_loss_ring):
        loss = losses.on_batch_shards(body, mesh, num_batched=2)
        (value, metrics), grads = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        )(*embeds, t, b)
        _assert_matches(value, grads, (ref_value, ref_grads))
        _assert_metrics(metrics, ref_metrics)
        assert grads[1].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
        results.append((value, grads))
    (chunked_value, chunked_grads), (ring_value, ring_grads) = results
    _assert_matches(ring_value, ring_grads, (chunked_value, chunked_grads))


@pytest.mark.parametrize("body", [losses.sigmoid_loss, losses.sigmoid_loss_ring])
def test_sigmoid_loss_pmap_runs_the_same_body(body):
    u, v, t, b = _sigmoid_inputs()
    n = jax.device_count()
    split = lambda x: x.reshape(n, -1, x.shape[-1])  # noqa: E731

    def per_device(u, v, t, b):
        return jax.value_and_grad(
            functools.partial(body, axis_name="batch"), argnums=(0, 1, 2, 3), has_aux=True
        )(u, v, t, b)

    (value, metrics), (gu, gv, gt, gb) = jax.pmap(
        per_device, axis_name="batch", in_axes=(0, 0, None, None)
    )(split(u), split(v), t, b)
    ref_value, ref_grads, ref_metrics = sigmoid_reference(u, v, t, b)
    np.testing.assert_allclose(value, np.full(n, ref_value), rtol=1e-5)
    _assert_metrics({k: m[0] for k, m in metrics.items()}, ref_metrics)
    # As for clip_loss: the pmean transposes into a psum (see the CLIP pmap test).
    got = (gu.reshape(u.shape) / n, gv.reshape(v.shape) / n, jnp.mean(gt), jnp.mean(gb))
    for got_grad, want in zip(got, ref_grads, strict=True):
        np.testing.assert_allclose(got_grad, want, rtol=1e-5, atol=1e-5)


def test_sigmoid_loss_ring_without_axis_is_the_single_device_loss():
    args = _sigmoid_inputs(batch=8)
    ring = losses.sigmoid_loss_ring(*args, axis_name=None)
    ref_value, _, ref_metrics = sigmoid_reference(*args)
    np.testing.assert_allclose(ring[0], ref_value, rtol=1e-5)
    _assert_metrics(ring[1], ref_metrics)


def test_sigmoid_loss_ring_builds_only_local_blocks():
    """Forward and backward of the ring form hold (B/k, B/k) logits, never (B/k, B), no gather."""
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    u, v, t, b = _sigmoid_inputs(batch=64)
    embeds = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v)]

    def compiled_hlo(body):
        loss = losses.on_batch_shards(body, mesh, num_batched=2)
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        return grad.lower(*embeds, t, b).compile().as_text()

    # The unchunked form does build (8, 64) rows: the check below can tell the two apart.
    assert "f32[8,64]" in compiled_hlo(losses.sigmoid_loss)
    ring = compiled_hlo(losses.sigmoid_loss_ring)
    assert "f32[8,8]" in ring
    assert "f32[8,64]" not in ring
    assert "f32[64,64]" not in ring
    assert "all-gather" not in ring
    assert "collective-permute" in ring


def _jsd_inputs(batch=32):
    u, v, _ = _embeddings(batch=batch, seed=3)
    return u, v, np.float32(5.0)


def test_jsd_cross_loss_single_device_matches_numpy():
    args = _jsd_inputs()
    (value, metrics), grads = jax.value_and_grad(
        losses.jsd_cross_loss, argnums=(0, 1, 2), has_aux=True
    )(*args)
    ref_value, ref_grads, ref_metrics = jsd_reference(*args)
    _assert_matches(value, grads, (ref_value, ref_grads))
    _assert_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_jsd_cross_loss_sharded_matches_numpy(mesh_shape):
    """Negatives roll within each device's slice: the reference rolls within as many groups."""
    mesh = sharding.make_mesh(mesh_shape)
    u, v, t = _jsd_inputs()
    loss = losses.on_batch_shards(losses.jsd_cross_loss, mesh, num_batched=2)
    embeds = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v)]
    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        *embeds, t
    )
    ref_value, ref_grads, ref_metrics = jsd_reference(
        u, v, t, groups=sharding.data_parallel_size(mesh)
    )
    _assert_matches(value, grads, (ref_value, ref_grads))
    _assert_metrics(metrics, ref_metrics)


def test_jsd_cross_loss_negatives_stay_on_their_device():
    """On 8 devices the loss is the mean of the 8 single-device losses on each slice."""
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    u, v, t = _jsd_inputs()
    loss = losses.on_batch_shards(losses.jsd_cross_loss, mesh, num_batched=2)
    sharded, _ = jax.jit(loss)(
        *(jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v)), t
    )
    per_slice = [
        losses.jsd_cross_loss(u_slice, v_slice, t)[0]
        for u_slice, v_slice in zip(np.split(u, 8), np.split(v, 8), strict=True)
    ]
    np.testing.assert_allclose(sharded, np.mean(per_slice), rtol=1e-5)
    # Rolling the global batch instead would give a different value.
    global_roll, _ = losses.jsd_cross_loss(u, v, t)
    assert abs(float(global_roll) - float(sharded)) > 1e-3


def test_jsd_cross_loss_sampled_negative_is_drawn_by_the_critic():
    """With one caption per row scored far above the rest, the draw is that caption: value and
    gradients are the numpy reference's with those negatives, on one device and on 8."""
    u, v, _ = _jsd_inputs()
    t = np.float32(50.0)
    n, local = len(u), len(u) // 8
    # Row i's favourite caption is i + 3 within its block of 4 (cyclically): make v[i+3]
    # nearly u[i]'s direction.
    i = np.arange(n)
    favourite = (i // local) * local + (i % local + 3) % local
    v = v.copy()
    v[favourite] = 0.3 * v[favourite] + u
    v /= np.linalg.norm(v, axis=1, keepdims=True)

    def reference(negative):
        u64, v64 = u.astype(np.float64), v.astype(np.float64)
        pos, neg = t * (u64 * v64).sum(1), t * (u64 * v64[negative]).sum(1)
        d_pos, d_neg = -_sigmoid(-pos) / n, _sigmoid(neg) / n
        grad_u = t * (d_pos[:, None] * v64 + d_neg[:, None] * v64[negative])
        grad_v = t * d_pos[:, None] * u64
        np.add.at(grad_v, negative, t * d_neg[:, None] * u64)
        value = _softplus(-pos).mean() + _softplus(neg).mean()
        return value, (grad_u, grad_v)

    sampled = functools.partial(losses.jsd_cross_loss, negative="sampled")
    rng = jax.random.PRNGKey(0)
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    on_8 = losses.on_batch_shards(sampled, mesh, num_batched=2)
    embeds = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (u, v)]
    value, grads = jax.jit(jax.value_and_grad(lambda a, b: on_8(a, b, t, rng)[0], (0, 1)))(*embeds)
    _assert_matches(value, grads, reference(favourite))

    # On one device the whole batch is local, the favourites are the same captions.
    value, grads = jax.value_and_grad(lambda a, b: sampled(a, b, t, rng)[0], (0, 1))(u, v)
    _assert_matches(value, grads, reference(favourite))


def test_sampled_negatives_are_never_the_positive_and_follow_the_critic():
    """Over many keys: never the diagonal, and frequencies ∝ exp(critic) off it (float64)."""
    u, v, _ = _jsd_inputs(batch=4)
    t = np.float32(2.0)
    keys = jax.random.split(jax.random.PRNGKey(1), 8000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: losses.sample_negatives(u, v, t, k)))(keys))
    assert (draws != np.arange(4)).all()
    scores = t * (u.astype(np.float64) @ v.T.astype(np.float64))
    for row in range(4):
        others = np.delete(np.arange(4), row)
        expected = np.exp(scores[row, others]) / np.exp(scores[row, others]).sum()
        observed = np.bincount(draws[:, row], minlength=4)[others] / len(keys)
        np.testing.assert_allclose(observed, expected, atol=0.02)


def _prior_inputs(batch=32):
    rng = np.random.default_rng(4)
    real, prior = (3 * rng.normal(size=(2, batch, 1))).astype(np.float32)
    return real, prior


def test_prior_loss_matches_numpy_and_is_the_same_sharded():
    real, prior = _prior_inputs()
    value, grads = jax.value_and_grad(losses.prior_loss, argnums=(0, 1))(real, prior)
    reference = prior_reference(real, prior)
    _assert_matches(value, grads, reference)

    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    loss = losses.on_batch_shards(losses.prior_loss, mesh, num_batched=2)
    logits = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (real, prior)]
    sharded_value, sharded_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*logits)
    _assert_matches(sharded_value, sharded_grads, (value, grads), tol=1e-6)
    _assert_matches(sharded_value, sharded_grads, reference)


def test_prior_loss_is_stable_for_large_logits():
    """Saturated discriminator logits give finite values and gradients (softplus, not log σ)."""
    real, prior = np.array([80.0, -80.0], np.float32), np.array([-80.0, 80.0], np.float32)
    value, grads = jax.value_and_grad(losses.prior_loss, argnums=(0, 1))(real, prior)
    _assert_matches(value, grads, prior_reference(real, prior))


def info_nce_reference(q, k, s):
    """Value and analytic gradients (q, k, s) of CE(s·QKᵀ, y), y_i = i, float64."""
    q, k, s = q.astype(np.float64), k.astype(np.float64), np.float64(s)
    n = len(q)
    sim = q @ k.T
    log_probs = _log_softmax(s * sim)
    d_logits = (np.exp(log_probs) - np.eye(n)) / n
    grads = (s * d_logits @ k, s * d_logits.T @ q, (d_logits * sim).sum())
    return -np.trace(log_probs) / n, grads


def simsiam_reference(p1, p2, z1, z2):
    """Value and analytic gradients (p1, p2, z1, z2) of −½[mean cos(p1, z2) + mean cos(p2, z1)].

    z is a constant (stop-gradient): its gradients are zero.
    """
    p1, p2, z1, z2 = (x.astype(np.float64) for x in (p1, p2, z1, z2))
    n = len(p1)

    def cos_and_grad(p, z):
        p_norm = np.linalg.norm(p, axis=1, keepdims=True)
        p_hat, z_hat = p / p_norm, z / np.linalg.norm(z, axis=1, keepdims=True)
        cos = (p_hat * z_hat).sum(1, keepdims=True)
        return cos[:, 0], (z_hat - cos * p_hat) / p_norm

    cos_12, d_12 = cos_and_grad(p1, z2)
    cos_21, d_21 = cos_and_grad(p2, z1)
    value = -0.5 * (cos_12.mean() + cos_21.mean())
    return value, (-0.5 * d_12 / n, -0.5 * d_21 / n, np.zeros_like(z1), np.zeros_like(z2))


def masked_lm_reference(logits, labels):
    """Value, analytic gradient (logits) and accuracy of the masked-position CE, float64."""
    logits = logits.astype(np.float64)
    masked = labels != 0
    flat, flat_labels = logits[masked], labels[masked]
    count = len(flat_labels)
    if count == 0:
        return 0.0, (np.zeros_like(logits),), 0.0
    log_probs = _log_softmax(flat)
    rows = np.arange(count)
    value = -log_probs[rows, flat_labels].sum() / count
    d_flat = np.exp(log_probs)
    d_flat[rows, flat_labels] -= 1.0
    grad = np.zeros_like(logits)
    grad[masked] = d_flat / count
    accuracy = (flat.argmax(1) == flat_labels).mean()
    return value, (grad,), accuracy


def test_new_references_match_finite_differences():
    """The info_nce, SimSiam and masked-LM numpy gradients are themselves right."""
    rng = np.random.default_rng(5)
    q, k = rng.normal(size=(2, 5, 3))
    for got, want in zip(
        info_nce_reference(q, k, 2.5)[1],
        _finite_difference(lambda *a: info_nce_reference(*a)[0], (q, k, 2.5)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    p1, p2, z1, z2 = rng.normal(size=(4, 5, 3))
    fd = _finite_difference(lambda a, b: simsiam_reference(a, b, z1, z2)[0], (p1, p2))
    for got, want in zip(simsiam_reference(p1, p2, z1, z2)[1][:2], fd, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    logits = rng.normal(size=(2, 3, 4))
    labels = np.array([[0, 2, 3], [1, 0, 0]])
    (got,) = masked_lm_reference(logits, labels)[1]
    (want,) = _finite_difference(lambda x: masked_lm_reference(x, labels)[0], (logits,))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def _shard_value_and_grad(body, mesh, arrays, replicated=(), argnums=(0,), has_aux=False):
    """jit(value_and_grad) of `body` under shard_map, `arrays` split over the batch axes."""
    loss = losses.on_batch_shards(body, mesh, num_batched=len(arrays))
    placed = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in arrays]
    grad = jax.value_and_grad(loss, argnums=argnums, has_aux=has_aux)
    return jax.jit(grad)(*placed, *replicated)


@pytest.mark.parametrize("body", [losses.info_nce, losses.info_nce_ring])
def test_info_nce_matches_numpy_on_one_and_eight_devices(body):
    u, v, s = _embeddings(seed=6)
    reference = info_nce_reference(u, v, s)
    value, grads = jax.value_and_grad(body, argnums=(0, 1, 2))(u, v, s)
    _assert_matches(value, grads, reference)
    for mesh_shape in MESH_SHAPES:
        mesh = sharding.make_mesh(mesh_shape)
        value, grads = _shard_value_and_grad(body, mesh, (u, v), (s,), (0, 1, 2))
        _assert_matches(value, grads, reference)
    # One direction only: swapping query and key changes the value.
    assert abs(float(body(v, u, s)) - reference[0]) > 1e-3


def _simsiam_inputs(batch=32, dim=12):
    rng = np.random.default_rng(7)
    # Unnormalised, with varied norms: the loss normalises.
    return tuple(
        (rng.normal(size=(4, batch, dim)) * rng.uniform(0.5, 3.0, (4, batch, 1))).astype(np.float32)
    )


def test_simsiam_loss_matches_numpy_on_one_and_eight_devices():
    args = _simsiam_inputs()
    reference = simsiam_reference(*args)
    value, grads = jax.value_and_grad(losses.simsiam_loss, argnums=(0, 1, 2, 3))(*args)
    _assert_matches(value, grads, reference)
    assert not np.any(grads[2]) and not np.any(grads[3])
    for mesh_shape in MESH_SHAPES:
        mesh = sharding.make_mesh(mesh_shape)
        value, grads = _shard_value_and_grad(losses.simsiam_loss, mesh, args, argnums=(0, 1, 2, 3))
        _assert_matches(value, grads, reference)


def _masked_lm_inputs(batch=32, length=6, vocab=11):
    """Logits and labels whose masked counts differ per 4-row slice, one slice with none."""
    rng = np.random.default_rng(8)
    logits = (2 * rng.normal(size=(batch, length, vocab))).astype(np.float32)
    tokens = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    rate = np.repeat([0.9, 0.1, 0.5, 0.0, 0.3, 0.7, 0.2, 0.05], batch // 8)
    masked = rng.uniform(size=(batch, length)) < rate[:, None]
    # Make some masked predictions right, so accuracy is neither 0 nor 1.
    hits = masked & (rng.uniform(size=masked.shape) < 0.4)
    tokens[hits] = logits.argmax(-1)[hits]
    tokens[hits & (tokens == 0)] = 1
    return logits, np.where(masked, tokens, 0).astype(np.int32)


def _assert_masked_lm_matches(result, reference, tol=1e-5):
    (value, accuracy), grads = result
    ref_value, ref_grads, ref_accuracy = reference
    _assert_matches(value, grads, (ref_value, ref_grads), tol)
    np.testing.assert_allclose(accuracy, ref_accuracy, rtol=tol, atol=tol)


def test_masked_lm_loss_weights_every_masked_token_equally():
    logits, labels = _masked_lm_inputs()
    reference = masked_lm_reference(logits, labels)
    assert 0.0 < reference[2] < 1.0
    slices = zip(np.split(logits, 8), np.split(labels, 8), strict=True)
    per_device_mean = np.mean([masked_lm_reference(x, y)[0] for x, y in slices])
    # The input has the power to tell a global mean from a mean of per-device means.
    assert abs(per_device_mean - reference[0]) > 1e-2
    single = jax.value_and_grad(losses.masked_lm_loss, (0,), has_aux=True)(logits, labels)
    _assert_masked_lm_matches(single, reference)
    for mesh_shape in MESH_SHAPES:
        mesh = sharding.make_mesh(mesh_shape)
        sharded = _shard_value_and_grad(losses.masked_lm_loss, mesh, (logits, labels), has_aux=True)
        _assert_masked_lm_matches(sharded, reference)


def test_masked_lm_loss_without_masked_tokens_is_zero_not_nan():
    logits, _ = _masked_lm_inputs()
    labels = np.zeros(logits.shape[:2], np.int32)
    single = jax.value_and_grad(losses.masked_lm_loss, (0,), has_aux=True)(logits, labels)
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    sharded = _shard_value_and_grad(losses.masked_lm_loss, mesh, (logits, labels), has_aux=True)
    for (value, accuracy), (grad,) in (single, sharded):
        assert float(value) == 0.0 and float(accuracy) == 0.0
        assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("body", ["info_nce", "info_nce_ring", "simsiam_loss", "masked_lm_loss"])
def test_new_losses_under_pmap_match_numpy(body):
    n = jax.device_count()
    split = lambda x: x.reshape(n, -1, *x.shape[1:])  # noqa: E731
    if body.startswith("info_nce"):
        u, v, s = _embeddings(seed=6)
        batched, replicated, want = (u, v), (s,), info_nce_reference(u, v, s)[0]
    elif body == "simsiam_loss":
        batched, replicated = _simsiam_inputs(), ()
        want = simsiam_reference(*batched)[0]
    else:
        batched, replicated = _masked_lm_inputs(), ()
        want = masked_lm_reference(*batched)[0]
    loss = functools.partial(getattr(losses, body), axis_name="batch")
    in_axes = (0,) * len(batched) + (None,) * len(replicated)
    got = jax.pmap(loss, axis_name="batch", in_axes=in_axes)(*map(split, batched), *replicated)
    got = got[0] if body == "masked_lm_loss" else got
    np.testing.assert_allclose(got, np.full(n, want), rtol=1e-5)
