"""Self-supervision terms: SimSiam's negative cosine and the masked-LM cross-entropy (DeCLIP),
SimCLR's NT-Xent (SLIP)."""

import functools

import jax
import jax.numpy as jnp
import optax

from clipjax.losses.common import _mean, row_logsumexp
from clipjax.sharding import device_index


def _cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Row-wise cosine similarity of (n, d) arrays; norms floored at `eps` (zero rows give 0)."""
    a = a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), eps * eps))
    b = b * jax.lax.rsqrt(jnp.maximum(jnp.sum(b * b, axis=-1, keepdims=True), eps * eps))
    return jnp.sum(a * b, axis=-1)


def simsiam_loss(
    p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array, axis_name=None
) -> jax.Array:
    """SimSiam's symmetric negative cosine similarity (DeCLIP's image self-supervision).

    Args:
      p1, p2: (b, D) predictor outputs for the two views of this device's images, unnormalised.
      z1, z2: (b, D) projector outputs for the same views, unnormalised; gradients are stopped.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.

    Returns:
      −½ [mean cos(p₁, sg(z₂)) + mean cos(p₂, sg(z₁))], means over the global batch; in
      [−1, 1], the same scalar on every device.
    """
    z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    local = -0.5 * (_cosine(p1, z2).mean() + _cosine(p2, z1).mean())
    return _mean(local, axis_name)


def masked_lm_loss(
    logits: jax.Array, labels: jax.Array, axis_name=None
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and accuracy over the masked token positions of the global batch.

    Args:
      logits: (b, L, V) vocabulary logits at every position of this device's captions.
      labels: (b, L) int32 original token ids at the masked positions, 0 everywhere else.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.

    Returns:
      (loss, accuracy): Σ CE / M and (number of masked positions whose argmax is the label) / M,
      sums over the masked positions of all devices and M the global number of masked
      positions, so every masked token weighs the same whichever device holds it. Both are 0
      when no position is masked. The same scalars on every device.
    """
    masked = labels != 0
    weights = masked.astype(jnp.float32)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, axis=-1) == labels) & masked
    sums = jnp.stack([(token_loss * weights).sum(), correct.sum(dtype=jnp.float32)])
    count = weights.sum()
    if axis_name is not None:
        sums, count = jax.lax.psum((sums, count), axis_name)
    # At least one: with nothing masked both sums are 0, and so are loss and accuracy.
    loss, accuracy = sums / jnp.maximum(count, 1.0)
    return loss, accuracy


def nt_xent_loss(
    view_1: jax.Array, view_2: jax.Array, temperature: float = 0.1, axis_name=None, *, ring=False
) -> jax.Array:
    """SimCLR's NT-Xent over the 2B embeddings of the global batch (SLIP's image term).

    Args:
      view_1, view_2: (b, d) this device's embeddings of two views of the same images,
        L2-normalised.
      temperature: τ dividing the cosine similarities (0.1 in SLIP).
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.
      ring: pass the embeddings around the device ring, (2b, 2b) logits at a time, instead of
        all-gathering them ((2b, 2B) logits).

    Returns:
      The mean over all 2B anchors of CE(logits, positive): each anchor's logits are its
      similarities / τ to the other 2B − 1 embeddings, its positive the other view of the same
      image; the same scalar on every device.
    """
    b = view_1.shape[0]
    queries = jnp.concatenate([view_1, view_2])
    own_rows = device_index(axis_name) * b + jnp.arange(b)

    def block(keys, offset):
        logits = queries @ jnp.concatenate(keys).T / temperature  # (2b, 2c)
        same = own_rows[:, None] == offset + jnp.arange(keys[0].shape[0])[None, :]
        no = jnp.zeros_like(same)
        itself = jnp.block([[same, no], [no, same]])
        return jnp.where(itself, -jnp.inf, logits)

    rows = row_logsumexp(block, (view_1, view_2), axis_name, ring=ring)
    positives = jnp.sum(view_1 * view_2, axis=-1) / temperature
    return _mean(jnp.mean(rows - jnp.concatenate([positives, positives])), axis_name)


nt_xent_loss_ring = functools.partial(nt_xent_loss, ring=True)
