"""Losses as pure functions of embeddings: no model inside, collectives explicit.

A loss that needs the global batch takes each device's local slice plus the name of the mesh
axes the batch is split over, and all-gathers itself. The same body therefore runs under
`jax.shard_map` (see `on_batch_shards`) and under `jax.pmap` with that axis name; with
`axis_name=None` it is the single-device loss.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from clipjax.sharding import BATCH_AXES


def _gather(x: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
    """All-gather the local batch `x` (b, ...) into (B, ...), and this slice's global offset."""
    if axis_name is None:
        return x, jnp.zeros((), jnp.int32)
    offset = jax.lax.axis_index(axis_name) * x.shape[0]
    return jax.lax.all_gather(x, axis_name, tiled=True), offset


def _mean(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


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
    all_images, offset = _gather(image_embed, axis_name)
    all_texts, _ = _gather(text_embed, axis_name)
    labels = offset + jnp.arange(image_embed.shape[0])
    image_to_text = logit_scale * image_embed @ all_texts.T
    text_to_image = logit_scale * text_embed @ all_images.T
    local = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(image_to_text, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(text_to_image, labels).mean()
    )
    return _mean(local, axis_name)


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
