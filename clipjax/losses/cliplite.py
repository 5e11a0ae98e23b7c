"""CLIP-Lite's Jensen–Shannon MI bound and Deep InfoMax's prior terms."""

import jax
import jax.numpy as jnp

from clipjax.losses.common import _mean
from clipjax.sharding import device_index

NEGATIVES = ("next", "sampled")


def sample_negatives(
    image_embed: jax.Array, text_embed: jax.Array, logit_scale: jax.Array, key: jax.Array
) -> jax.Array:
    """(b,) int: for each image i one caption index j ≠ i, drawn with probability
    ∝ exp(logit_scale·⟨x_i, y_j⟩) among these b captions; the draw is not differentiated."""
    scores = logit_scale * jax.lax.stop_gradient(image_embed @ text_embed.T)
    scores = jnp.where(jnp.eye(len(scores), dtype=bool), -jnp.inf, scores)
    return jax.random.categorical(key, scores, axis=-1)


def jsd_cross_loss(
    image_embed: jax.Array,
    text_embed: jax.Array,
    logit_scale: jax.Array,
    rng: jax.Array | None = None,
    axis_name=None,
    *,
    negative: str = "next",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP-Lite's Jensen–Shannon MI bound with one negative caption per image.

    Args:
      image_embed: (b, d) this device's image critic embeddings, L2-normalised.
      text_embed: (b, d) the paired text critic embeddings, L2-normalised.
      logit_scale: scalar exp(τ), unclamped; the critic is T(x, y) = logit_scale·⟨x, y⟩.
      rng: PRNG key, needed only by `negative="sampled"`; the same on every device.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.
      negative: which one caption of this device's batch is image i's negative: "next", the
        caption y_{i+1} (cyclically), as CLIP-Lite has it; "sampled", one caption y_j, j ≠ i,
        drawn with probability ∝ exp(T(x_i, y_j)) (hard-negative sampling; the draw is not
        differentiated, the critic value it picks is).

    Returns:
      (loss, metrics): mean_i softplus(−T(x_i, y_i)) + mean_i softplus(T(x_i, y'_i)), the
      means over the global batch; `critic_pos` / `critic_neg` are the mean critic values.
      Identical on every device. Nothing crosses devices but the means.
    """
    if negative not in NEGATIVES:
        raise ValueError(f"negative={negative!r} is unknown; use one of {NEGATIVES}.")
    critic_pos = logit_scale * jnp.sum(image_embed * text_embed, axis=-1)
    if negative == "next":
        negatives = jnp.roll(text_embed, -1, axis=0)
    else:
        key = jax.random.fold_in(rng, device_index(axis_name))
        negatives = text_embed[sample_negatives(image_embed, text_embed, logit_scale, key)]
    critic_neg = logit_scale * jnp.sum(image_embed * negatives, axis=-1)
    loss = jnp.mean(jax.nn.softplus(-critic_pos)) + jnp.mean(jax.nn.softplus(critic_neg))
    metrics = {
        "critic_pos": _mean(critic_pos.mean(), axis_name),
        "critic_neg": _mean(critic_neg.mean(), axis_name),
    }
    return _mean(loss, axis_name), metrics


def prior_loss(real_logits: jax.Array, prior_logits: jax.Array, axis_name=None) -> jax.Array:
    """Deep InfoMax's prior term from discriminator logits (pre-sigmoid).

    Args:
      real_logits: (b,) or (b, 1) discriminator logits on this device's features.
      prior_logits: (b,) or (b, 1) discriminator logits on samples of the prior U[0, 1)^d.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.

    Returns:
      −(mean log D(prior) + mean log(1 − D(real))) with D = σ(logits), means over the global
      batch; computed as mean softplus(−prior_logits) + mean softplus(real_logits).
    """
    loss = jnp.mean(jax.nn.softplus(-prior_logits)) + jnp.mean(jax.nn.softplus(real_logits))
    return _mean(loss, axis_name)


def prior_fool_loss(feature_logits: jax.Array, axis_name=None) -> jax.Array:
    """The towers' side of an adversarial prior term: −mean log D(features), the non-saturating
    GAN form, so the towers still learn while the discriminator wins.

    Args:
      feature_logits: (b,) logits of a discriminator held fixed (its parameters under
        stop_gradient) on this device's features.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.

    Returns:
      mean softplus(−feature_logits) over the global batch.
    """
    return _mean(jnp.mean(jax.nn.softplus(-feature_logits)), axis_name)
