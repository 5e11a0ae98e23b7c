"""DeCLIP's nearest-neighbour queue: one global FIFO of unit-norm embeddings, as pure functions.

The queue is a plain pytree kept in the training state:
  {"embeds": float32 (Q, d) L2-normalised rows, "pointer": int32 (next row to write),
   "count": int32 (rows written so far, saturating at Q)}.
In training `embeds` is split along its rows over the mesh's batch axes, the same devices that
split the batch: device i of k holds the contiguous rows [i·Q/k, (i+1)·Q/k). `pointer` and
`count` are replicated. `lookup` and `enqueue` take that local block plus the batch axis name
and run inside `jax.shard_map` with `STATE_SPECS` (or under `jax.pmap`); with
`axis_name=None` the block is the whole queue.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from clipjax.sharding import BATCH_AXES, device_index

# shard_map in_specs / out_specs of the queue state.
STATE_SPECS = {
    "embeds": PartitionSpec(BATCH_AXES),
    "pointer": PartitionSpec(),
    "count": PartitionSpec(),
}


def init(rng: jax.Array, size: int, dim: int) -> dict[str, jax.Array]:
    """A queue of `size` random unit vectors of dimension `dim`, none of them written yet."""
    embeds = jax.random.normal(rng, (size, dim), jnp.float32)
    return {
        "embeds": embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True),
        "pointer": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
    }


def _devices(axis_name) -> int:
    return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _gather(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def lookup(queries: jax.Array, queue_block: jax.Array, axis_name=None) -> jax.Array:
    """The queue row most similar to each query, over the whole global queue.

    Args:
      queries: (b, d) this device's queries, L2-normalised.
      queue_block: (Q/k, d) this device's block of the queue's `embeds`.
      axis_name: mesh axis (or tuple of axes) the batch and the queue are split over; None on
        one device.

    Returns:
      (b, d) for each query the row with the largest dot product (= cosine similarity) among
      all Q rows, gradient stopped. Ties go to the lowest global row index, so a sharded run
      returns exactly what a single-device run returns.

    Every device scores all B queries against its own block (B × Q/k scores), the best block
    row per query is chosen across devices from k candidate scores, and the winning device
    sends the row to the device that holds the query (one reduce-scatter of B × d).
    """
    queries = jax.lax.stop_gradient(queries)
    queue_block = jax.lax.stop_gradient(queue_block)
    all_queries = _gather(queries, axis_name)
    scores = all_queries @ queue_block.T
    # argmax keeps the first maximum: the lowest row within the block...
    best_row = jnp.argmax(scores, axis=1)
    candidates = queue_block[best_row]
    if axis_name is None:
        return candidates
    best_score = jnp.take_along_axis(scores, best_row[:, None], axis=1)[:, 0]
    # ...and here the lowest device; blocks are contiguous, so the lowest global row.
    winner = jnp.argmax(jax.lax.all_gather(best_score, axis_name), axis=0)
    mine = jnp.where((winner == device_index(axis_name))[:, None], candidates, 0.0)
    # Exactly one device contributes each row, so the sum is exact.
    return jax.lax.psum_scatter(mine, axis_name, scatter_dimension=0, tiled=True)


def enqueue(
    state: dict[str, jax.Array], new_embeds: jax.Array, axis_name=None
) -> dict[str, jax.Array]:
    """Write the global batch of `new_embeds` into the FIFO, oldest rows first out.

    Args:
      state: the queue state with this device's block of `embeds` (Q/k, d).
      new_embeds: (n_local, d) this device's new rows, L2-normalised; gradient stopped.
      axis_name: mesh axis (or tuple of axes) the batch and the queue are split over; None on
        one device.

    Returns:
      The new state: the n = n_local·k rows of the global batch, in global batch order, written
      at global rows pointer, pointer + 1, … (mod Q); pointer advanced by n (mod Q) and count by
      n (at most Q). Each device writes only the rows of its own block.

    Raises:
      ValueError: (at trace time) if the global batch n exceeds the queue size Q.
    """
    block = state["embeds"]
    size = block.shape[0] * _devices(axis_name)
    new_rows = _gather(jax.lax.stop_gradient(new_embeds), axis_name)
    n = new_rows.shape[0]
    if n > size:
        raise ValueError(
            f"nn_queue.enqueue: the global batch of {n} new rows exceeds the queue size {size}; "
            "use a queue at least as large as the global batch."
        )
    pointer = state["pointer"]
    global_row = device_index(axis_name) * block.shape[0] + jnp.arange(block.shape[0])
    # Position of each of this block's rows in the write order starting at `pointer`.
    slot = jnp.mod(global_row - pointer, size)
    written = slot < n
    incoming = new_rows[jnp.minimum(slot, n - 1)].astype(block.dtype)
    return {
        "embeds": jnp.where(written[:, None], incoming, block),
        "pointer": jnp.mod(pointer + n, size).astype(jnp.int32),
        "count": jnp.minimum(state["count"] + n, size).astype(jnp.int32),
    }


def fill(state: dict[str, jax.Array], axis_name=None) -> jax.Array:
    """Fraction of the queue written so far, count / Q, in [0, 1].

    Called on the global state, or inside `shard_map` on a block with the batch `axis_name`.
    """
    size = state["embeds"].shape[0] * _devices(axis_name)
    return state["count"].astype(jnp.float32) / size
