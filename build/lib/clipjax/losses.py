"""Losses as pure functions of embeddings: no model inside, collectives explicit.

A loss that needs the global batch takes each device's local slice plus the name of the mesh
axes the batch is split over, and all-gathers itself (or passes chunks around the device ring).
The same body therefore runs under `jax.shard_map` (see `on_batch_shards`) and under `jax.pmap`
with that axis name; with `axis_name=None` it is the single-device loss.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from clipjax.sharding import BATCH_AXES, device_index


def _gather(x: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
    """All-gather the local batch `x` (b, ...) into (B, ...), and this slice's global offset."""
    offset = device_index(axis_name) * x.shape[0]
    if axis_name is None:
        return x, offset
    return jax.lax.all_gather(x, axis_name, tiled=True), offset


def _mean(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


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


def on_batch_shards(loss_body: Callable, mesh: Mesh, num_batched: int) -> Callable:
    """Run `loss_body(*batched, *replicated, axis_name=...)` under `jax.shard_map`.

    The first `num_batched` arguments are split over the mesh's batch axes; the rest are
    replicated. The body must return values that are identical on every device (a pmean'd
    loss, metrics).
    """

    def call(*args):
        specs = tuple(
            PartitionSpec(BATCH_AXES) if i < num_batched else PartitionSpec()
            for i in range(len(args))
        )

        def body(*local_args):
            return loss_body(*local_args, axis_name=BATCH_AXES)

        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec())(*args)

    return call
