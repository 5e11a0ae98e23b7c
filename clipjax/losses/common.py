"""What every loss on the global batch shares: the gather, the mean, and the shard_map wrapper."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
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


def _ring_neighbours(axis_name) -> list[tuple[int, int]]:
    devices = jax.lax.axis_size(axis_name)
    return [(i, (i + 1) % devices) for i in range(devices)]


def row_logsumexp(block: Callable, keys, axis_name, *, ring: bool) -> jax.Array:
    """Log-sum-exp over the global batch of each local query's logits, from a block function.

    `block(keys, offset)` returns the (b, c) logits of this device's queries against `keys`, a
    pytree of (c, ...) arrays holding the keys of global indices offset .. offset + c − 1.
    With `ring=False` the keys are all-gathered and one (b, B) block is built. With `ring=True`
    the key chunks travel around the device ring, and each device folds the (b, b) block of
    every chunk it receives into a running log-sum-exp: one block is alive at a time, forward
    and backward (each hop is rematerialised). Both give (b,), equal up to rounding.
    """
    if axis_name is None:
        return jax.nn.logsumexp(block(keys, 0), axis=1)
    if not ring:
        gathered = jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), keys)
        return jax.nn.logsumexp(block(gathered, 0), axis=1)
    devices = jax.lax.axis_size(axis_name)
    chunk = jax.tree.leaves(keys)[0].shape[0]
    me = jax.lax.axis_index(axis_name)
    rows = jax.nn.logsumexp(block(keys, me * chunk), axis=1)

    @jax.checkpoint
    def hop(carry, step):
        keys, rows = carry
        keys = jax.lax.ppermute(keys, axis_name, _ring_neighbours(axis_name))
        # After `step` hops the chunk held here came from the device `step` places back.
        offset = ((me - step) % devices) * chunk
        return (keys, jnp.logaddexp(rows, jax.nn.logsumexp(block(keys, offset), axis=1))), None

    (_, rows), _ = jax.lax.scan(hop, (keys, rows), jnp.arange(1, devices))
    return rows
