"""SigLIP's pairwise sigmoid loss, all-gathered or as a device ring."""

import jax
import jax.numpy as jnp

from clipjax.losses.common import _gather, _mean


def _sigmoid_sums(image_embed, text_embed, logit_scale, bias, positive):
    """Σ −log σ(z·logit) and Σ logit over the pairs image_embed × text_embed.

    `positive` (a boolean mask broadcastable to the (b, c) logits) marks z = +1; every other
    pair is a negative, z = −1.
    """
    logits = logit_scale * image_embed @ text_embed.T + bias
    signs = jnp.where(positive, 1.0, -1.0).astype(logits.dtype)
    return -jax.nn.log_sigmoid(signs * logits).sum(), logits.sum()


def _sigmoid_metrics(
    image_embed, text_embed, logit_scale, bias, logit_sum, global_batch, axis_name
):
    """Means of the positive and of the negative logits over the global batch."""
    positives = logit_scale * jnp.sum(image_embed * text_embed, axis=-1) + bias
    b = image_embed.shape[0]
    negative_sum = logit_sum - positives.sum()
    return {
        "pos_logit_mean": _mean(positives.mean(), axis_name),
        "neg_logit_mean": _mean(negative_sum / (b * (global_batch - 1)), axis_name),
    }


def sigmoid_loss(
    image_embed: jax.Array,
    text_embed: jax.Array,
    logit_scale: jax.Array,
    bias: jax.Array,
    axis_name=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's pairwise sigmoid loss over the global batch, each device holding (b, B) logits.

    Args:
      image_embed: (b, d) this device's image embeddings, L2-normalised.
      text_embed: (b, d) the paired text embeddings, L2-normalised.
      logit_scale: scalar `t` (already exponentiated) multiplying the cosine similarities.
      bias: scalar `b` added to every logit.
      axis_name: mesh axis (or tuple of axes) the batch is split over; None on one device.

    Returns:
      (loss, metrics): −(1/B) Σ_i Σ_j log σ(z_ij (t·⟨x_i, y_j⟩ + b)) with z = +1 on the
      diagonal and −1 elsewhere, and `pos_logit_mean` / `neg_logit_mean`, the means of the
      diagonal and off-diagonal logits; all identical on every device.
    """
    all_texts, offset = _gather(text_embed, axis_name)
    b, global_batch = image_embed.shape[0], all_texts.shape[0]
    positive = (offset + jnp.arange(b))[:, None] == jnp.arange(global_batch)[None, :]
    local_sum, logit_sum = _sigmoid_sums(image_embed, all_texts, logit_scale, bias, positive)
    # pmean of (local sum / b) is the global sum divided by the global batch B.
    loss = _mean(local_sum / b, axis_name)
    metrics = _sigmoid_metrics(
        image_embed, text_embed, logit_scale, bias, logit_sum, global_batch, axis_name
    )
    return loss, metrics


def sigmoid_loss_ring(
    image_embed: jax.Array,
    text_embed: jax.Array,
    logit_scale: jax.Array,
    bias: jax.Array,
    axis_name,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sigmoid_loss` computed in chunks: text embeddings travel around the device ring.

    In k − 1 hops (k devices along `axis_name`) each device passes its current text chunk to the
    next device and scores its images against the chunk it receives, so no device ever holds
    more than (b, b) logits, b = B/k. Only the first block, the device's own captions, holds
    positives. Arguments and result as in `sigmoid_loss`, which it equals, gradients included.
    """
    if axis_name is None:
        return sigmoid_loss(image_embed, text_embed, logit_scale, bias)
    devices = jax.lax.axis_size(axis_name)
    b = image_embed.shape[0]
    to_next = [(i, (i + 1) % devices) for i in range(devices)]
    # Rematerialised: the backward pass recomputes each block's logits from its text chunk,
    # instead of keeping all k blocks (b × B logits in all) alive as residuals.
    block_sums = jax.checkpoint(_sigmoid_sums)
    texts = text_embed
    own = jnp.eye(b, dtype=bool)
    local_sum, logit_sum = block_sums(image_embed, texts, logit_scale, bias, own)
    for _ in range(devices - 1):
        texts = jax.lax.ppermute(texts, axis_name, to_next)
        block_sum, block_logit_sum = block_sums(image_embed, texts, logit_scale, bias, False)
        local_sum += block_sum
        logit_sum += block_logit_sum
    loss = _mean(local_sum / b, axis_name)
    metrics = _sigmoid_metrics(
        image_embed, text_embed, logit_scale, bias, logit_sum, b * devices, axis_name
    )
    return loss, metrics
