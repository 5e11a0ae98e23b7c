"""InfoNCE and CLIP's symmetric loss over the global batch, all-gathered or as a device ring."""

import functools

import jax
import jax.numpy as jnp
import optax

from clipjax.losses.common import _gather, _mean


def info_nce(
    query_embed: jax.Array, key_embed: jax.Array, logit_scale: jax.Array, axis_name=None
) -> jax.Array:
    """One-directional InfoNCE: each query against every key of the global batch.

    Args:
      query_embed: (b, d) this device's queries, L2-normalised.
      key_embed: (b, d) the paired keys, L2-normalised; query i's positive is key i.
      logit_scale: scalar `s` multiplying the cosine similarities.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.

    Returns:
      CE(s·Q Kᵀ, y) averaged over the global batch B, y the global index of each query; the
      same scalar on every device. Each device builds only its (b, B) rows of the logits.
    """
    all_keys, offset = _gather(key_embed, axis_name)
    labels = offset + jnp.arange(query_embed.shape[0])
    logits = logit_scale * query_embed @ all_keys.T
    local = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return _mean(local, axis_name)


def clip_loss(
    image_embed: jax.Array, text_embed: jax.Array, logit_scale: jax.Array, axis_name=None
) -> jax.Array:
    """Symmetric InfoNCE over the global batch (CLIP).

    Args:
      image_embed: (b, d) this device's image embeddings, L2-normalised.
      text_embed: (b, d) the paired text embeddings, L2-normalised.
      logit_scale: scalar `s` multiplying the cosine similarities.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.

    Returns:
      ½ [CE(s·U Vᵀ, y) + CE(s·V Uᵀ, y)] averaged over the global batch B, the same scalar on
      every device. Each device builds only its (b, B) rows of both logit matrices.
    """
    image_to_text = info_nce(image_embed, text_embed, logit_scale, axis_name)
    text_to_image = info_nce(text_embed, image_embed, logit_scale, axis_name)
    return 0.5 * (image_to_text + text_to_image)


def _lse_block(query_embed, key_embed, logit_scale, columns: bool):
    """Log-sum-exps of one (b, c) block of logits s·Q Kᵀ: over each row, and over each column
    when `columns` (else None)."""
    logits = logit_scale * query_embed @ key_embed.T
    rows = jax.nn.logsumexp(logits, axis=1)
    return rows, jax.nn.logsumexp(logits, axis=0) if columns else None


def _ring_lse(query_embed, key_embed, logit_scale, axis_name, columns: bool):
    """Log-sum-exps over the global batch of each local query's logits against every key and,
    with `columns`, of each local key's logits against every query; no device holds more than
    one (b, b) block of logits.

    Key chunks travel around the ring of the k devices along `axis_name`, each carrying the
    running column log-sum-exp of its keys; each device folds every chunk it receives into the
    running row log-sum-exp of its queries (an online log-sum-exp in both directions). After
    k − 1 hops a chunk has met every device's queries, and one more hop brings its column
    log-sum-exp home. The hops are a `lax.scan` of a rematerialised step, so one block at a
    time is alive, forward and backward: the backward pass recomputes each block's logits from
    its chunk (the idea of Inf-CL).
    """
    block = functools.partial(_lse_block, logit_scale=logit_scale, columns=columns)
    rows, cols = block(query_embed, key_embed)
    if axis_name is None:
        return rows, cols
    devices = jax.lax.axis_size(axis_name)
    to_next = [(i, (i + 1) % devices) for i in range(devices)]

    @jax.checkpoint
    def hop(carry, _):
        keys, rows, cols = carry
        keys, cols = jax.lax.ppermute((keys, cols), axis_name, to_next)
        block_rows, block_cols = block(query_embed, keys)
        rows = jnp.logaddexp(rows, block_rows)
        cols = jnp.logaddexp(cols, block_cols) if columns else None
        return (keys, rows, cols), None

    (_, rows, cols), _ = jax.lax.scan(hop, (key_embed, rows, cols), length=devices - 1)
    if columns:
        cols = jax.lax.ppermute(cols, axis_name, to_next)
    return rows, cols


def info_nce_ring(
    query_embed: jax.Array, key_embed: jax.Array, logit_scale: jax.Array, axis_name=None
) -> jax.Array:
    """`info_nce` computed in (b, b) blocks as the keys travel around the device ring; equal to
    it, gradients included, with O(b²) rather than O(b·B) logits per device. Arguments and
    result as in `info_nce`."""
    rows, _ = _ring_lse(query_embed, key_embed, logit_scale, axis_name, columns=False)
    positives = logit_scale * jnp.sum(query_embed * key_embed, axis=-1)
    return _mean(jnp.mean(rows - positives), axis_name)


def clip_loss_ring(
    image_embed: jax.Array, text_embed: jax.Array, logit_scale: jax.Array, axis_name=None
) -> jax.Array:
    """`clip_loss` computed in (b, b) blocks as the texts travel around the device ring: each
    block gives both directions' log-sum-exps at once (see `_ring_lse`). Equal to `clip_loss`,
    gradients included, with O(b²) rather than O(b·B) logits per device. Arguments and result
    as in `clip_loss`."""
    image_lse, text_lse = _ring_lse(image_embed, text_embed, logit_scale, axis_name, columns=True)
    positives = logit_scale * jnp.sum(image_embed * text_embed, axis=-1)
    local = 0.5 * (jnp.mean(image_lse - positives) + jnp.mean(text_lse - positives))
    return _mean(local, axis_name)
