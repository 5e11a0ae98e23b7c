"""The nearest-neighbour queue against a numpy FIFO, on one device and sharded over 8."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from clipjax import nn_queue, sharding

MESH_SHAPES = [
    {"data": 8, "fsdp": 1, "model": 1},
    {"data": 4, "fsdp": 2, "model": 1},
    {"data": 2, "fsdp": 2, "model": 2},
]


def _unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class FifoReference:
    """The global queue written one row at a time, oldest row overwritten first."""

    def __init__(self, embeds):
        self.embeds = np.array(embeds)
        self.slots = collections.deque(range(len(embeds)))
        self.count = 0

    def push(self, rows):
        for row in rows:
            slot = self.slots.popleft()
            self.embeds[slot] = row
            self.slots.append(slot)
            self.count = min(self.count + 1, len(self.embeds))

    @property
    def pointer(self):
        return self.slots[0]

    def nearest(self, queries):
        scores = queries.astype(np.float64) @ self.embeds.astype(np.float64).T
        return self.embeds[scores.argmax(axis=1)]


def _assert_state(state, reference):
    np.testing.assert_array_equal(state["embeds"], reference.embeds)
    assert int(state["pointer"]) == reference.pointer
    assert int(state["count"]) == reference.count
    np.testing.assert_allclose(nn_queue.fill(state), reference.count / len(reference.embeds))


def _single_device_step(state, queries):
    """Look up this batch's neighbours, then enqueue the batch (the DeCLIP order)."""
    return nn_queue.lookup(queries, state["embeds"]), nn_queue.enqueue(state, queries)


def _sharded_step(mesh):
    """The same step inside `jax.shard_map`, as the DeCLIP objective calls it."""

    def body(state, queries):
        axis = sharding.BATCH_AXES
        return nn_queue.lookup(queries, state["embeds"], axis), nn_queue.enqueue(
            state, queries, axis
        )

    batch = PartitionSpec(sharding.BATCH_AXES)
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(nn_queue.STATE_SPECS, batch),
            out_specs=(batch, nn_queue.STATE_SPECS),
        )
    )


def test_init_gives_unit_rows_and_an_empty_queue():
    state = nn_queue.init(jax.random.key(0), 16, 8)
    assert state["embeds"].shape == (16, 8) and state["embeds"].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(state["embeds"], axis=1), 1.0, rtol=1e-6)
    assert int(state["pointer"]) == 0 and int(state["count"]) == 0
    assert float(nn_queue.fill(state)) == 0.0


def test_enqueue_is_a_fifo_across_wraparound_and_count_saturates():
    rng = np.random.default_rng(0)
    state = nn_queue.init(jax.random.key(1), 10, 4)
    reference = FifoReference(state["embeds"])
    enqueue = jax.jit(nn_queue.enqueue)
    fills = []
    for _ in range(6):  # 24 rows through a queue of 10: wraps around twice
        rows = _unit_rows(rng, 4, 4)
        state = enqueue(state, rows)
        reference.push(rows)
        _assert_state(state, reference)
        fills.append(float(nn_queue.fill(state)))
    np.testing.assert_allclose(fills, [0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_enqueue_rejects_a_batch_larger_than_the_queue():
    state = nn_queue.init(jax.random.key(2), 8, 4)
    with pytest.raises(ValueError, match="global batch of 9 new rows exceeds the queue size 8"):
        nn_queue.enqueue(state, np.ones((9, 4), np.float32))


def test_lookup_is_the_argmax_over_the_whole_queue_without_gradient():
    rng = np.random.default_rng(3)
    queue = _unit_rows(rng, 50, 6)
    queries = _unit_rows(rng, 12, 6)
    reference = FifoReference(queue)
    np.testing.assert_array_equal(nn_queue.lookup(queries, queue), reference.nearest(queries))
    grads = jax.grad(lambda q, e: jnp.sum(nn_queue.lookup(q, e) * q), argnums=(0, 1))(
        queries, queue
    )
    # Only the explicit factor q carries gradient; the neighbours are constants.
    np.testing.assert_array_equal(grads[0], reference.nearest(queries))
    assert not np.any(grads[1])


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_sharded_queue_matches_single_device_and_numpy_exactly(mesh_shape):
    """Q = 64 rows in 8 blocks of 8; global batches of 24 cross blocks and wrap around."""
    mesh = sharding.make_mesh(mesh_shape)
    rng = np.random.default_rng(4)
    state = nn_queue.init(jax.random.key(5), 64, 8)
    shardings = {name: NamedSharding(mesh, spec) for name, spec in nn_queue.STATE_SPECS.items()}
    sharded_state = jax.device_put(state, shardings)
    reference = FifoReference(state["embeds"])
    single_step, sharded_step = jax.jit(_single_device_step), _sharded_step(mesh)
    for _ in range(5):
        queries = _unit_rows(rng, 24, 8)
        expected = reference.nearest(queries)
        reference.push(queries)
        neighbours, state = single_step(state, queries)
        sharded_neighbours, sharded_state = sharded_step(
            sharded_state, jax.device_put(queries, sharding.batch_sharding(mesh))
        )
        np.testing.assert_array_equal(neighbours, expected)
        np.testing.assert_array_equal(sharded_neighbours, neighbours)
        _assert_state(state, reference)
        _assert_state(sharded_state, reference)
    assert sharded_state["embeds"].sharding.is_equivalent_to(shardings["embeds"], 2)


def test_ties_go_to_the_lowest_global_row_on_one_and_eight_devices():
    """Two different rows score exactly the same: the lower global row wins, on every layout."""
    dim = 5
    queue = np.zeros((64, dim), np.float32)
    queue[:, 3] = 1.0  # filler rows score 0 against both queries below
    tied = {
        # query e0: rows 41 (device 5) and 17 (device 2) both score 0.6 -> row 17.
        0: ((41, [0.6, 0.0, 0.8, 0.0, 0.0]), (17, [0.6, 0.0, 0.0, 0.0, 0.8])),
        # query e1: rows 12 and 9 (both on device 1) both score 0.6 -> row 9.
        1: ((12, [0.0, 0.6, 0.8, 0.0, 0.0]), (9, [0.0, 0.6, 0.0, 0.0, 0.8])),
    }
    queries = np.zeros((8, dim), np.float32)
    for axis, rows in tied.items():
        queries[axis::2, axis] = 1.0
        for row, vector in rows:
            queue[row] = vector
    expected = np.where(np.arange(8)[:, None] % 2 == 0, queue[17], queue[9])
    np.testing.assert_array_equal(nn_queue.lookup(queries, queue), expected)

    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    batch = PartitionSpec(sharding.BATCH_AXES)
    lookup = jax.jit(
        jax.shard_map(
            lambda q, e: nn_queue.lookup(q, e, sharding.BATCH_AXES),
            mesh=mesh,
            in_specs=(batch, batch),
            out_specs=batch,
        )
    )
    np.testing.assert_array_equal(lookup(queries, queue), expected)


def test_lookup_before_enqueue_never_returns_the_current_batch():
    """Each query would be its own best match (score 1) once enqueued; looked up first, never."""
    rng = np.random.default_rng(6)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
    step = _sharded_step(mesh)
    state = nn_queue.init(jax.random.key(7), 64, 8)
    queries = _unit_rows(rng, 24, 8)
    neighbours, state = step(state, queries)
    assert not np.any(np.all(np.asarray(neighbours)[:, None] == queries[None], axis=-1))
    # The construction has teeth: the same lookup after the enqueue returns the queries.
    after, _ = step(state, queries)
    np.testing.assert_array_equal(after, queries)


def test_sharded_step_never_holds_the_whole_queue():
    """Each device keeps its (Q/k, d) block: no (Q, d) array in the compiled step."""
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    state = nn_queue.init(jax.random.key(8), 64, 8)
    queries = jax.ShapeDtypeStruct((24, 8), jnp.float32)
    hlo = _sharded_step(mesh).lower(state, queries).compile().as_text()
    assert "f32[8,8]" in hlo
    assert "f32[64,8]" not in hlo
