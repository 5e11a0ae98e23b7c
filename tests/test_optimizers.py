"""Schedule, weight-decay masks and Lookahead against hand computations."""

import jax
import numpy as np
import optax

from clipjax import optimizers
from configs.clip_vitb32 import get_config


def _optim(**fields):
    optim = get_config("local").optim
    for key, value in fields.items():
        optim[key] = value
    return optim


def test_schedule_warms_up_then_decays_to_zero():
    optim = _optim(warmup_steps=10)
    schedule = optimizers.make_schedule(optim, total_steps=100)
    assert schedule(0) == 0.0
    np.testing.assert_allclose(schedule(5), optim.lr / 2, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), optim.lr, rtol=1e-6)
    np.testing.assert_allclose(schedule(55), optim.lr / 2, rtol=1e-5)
    np.testing.assert_allclose(schedule(100), 0.0, atol=1e-9)


def _params():
    return {
        "kernel": np.ones((2, 2), np.float32),
        "bias": np.ones(2, np.float32),
        "logit_scale": np.ones((), np.float32),
    }


def test_weight_decay_skips_biases_norms_and_logit_scale():
    for name in ("adamw", "sgd_lookahead"):
        optim = _optim(name=name, grad_clip=0.0, weight_decay=0.5, momentum=0.0)
        tx = optimizers.make_optimizer(optim, optax.constant_schedule(1.0))
        params = _params()
        zero_grads = jax.tree.map(np.zeros_like, params)
        updates, _ = tx.update(zero_grads, tx.init(params), params)
        np.testing.assert_allclose(updates["kernel"], -0.5 * params["kernel"], err_msg=name)
        np.testing.assert_allclose(updates["bias"], 0.0, err_msg=name)
        np.testing.assert_allclose(updates["logit_scale"], 0.0, err_msg=name)


def test_lookahead_matches_a_hand_rolled_loop():
    """Plain-SGD fast steps; every k steps slow += alpha (fast - slow) and fast restarts there."""
    lr, k, alpha = 0.1, 3, 0.5
    tx = optimizers.lookahead(optax.sgd(lr), sync_period=k, alpha=alpha)
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(7, 4))
    params = np.zeros(4, np.float32)
    state = tx.init(params)
    fast = slow = np.zeros(4)
    for step, g in enumerate(grads, start=1):
        updates, state = tx.update(g.astype(np.float32), state, params)
        params = optax.apply_updates(params, updates)
        fast = fast - lr * g
        if step % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow
        np.testing.assert_allclose(params, fast, rtol=1e-5, atol=1e-6)
