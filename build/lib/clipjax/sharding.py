"""The device mesh and the one table that maps logical axis names onto it.

Model code names logical axes ("batch", "embed", "mlp", ...); these rules place them on the mesh
axes `data`, `fsdp` and `model`. Pure data parallel, FSDP and tensor parallel differ only in the
mesh sizes in the config.
"""

import math
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clipjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")
# The batch is split over every axis that holds a different slice of the data.
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("queue", BATCH_AXES),  # DeCLIP's feature queue: rows split like the batch
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("joint", None),
    ("length", None),
)


def device_index(axis_name) -> jax.Array:
    """This device's index along `axis_name` inside a shard_map or pmap body (0 for None, the
    single-device form of a loss)."""
    return jnp.zeros((), jnp.int32) if axis_name is None else jax.lax.axis_index(axis_name)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A (data, fsdp, model) mesh; one size of -1 takes all devices left over. ConfigError if
    the sizes do not fit the devices present."""
    devices = jax.devices() if devices is None else devices
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {sizes}.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ConfigError(
                f"config.mesh: {len(devices)} devices do not split into {sizes}; "
                f"the fixed axes' product {fixed} must divide the device count."
            )
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(
            f"config.mesh: axis sizes {sizes} use {math.prod(sizes.values())} devices but "
            f"{len(devices)} are present; set one axis to -1 to take the rest."
        )
    grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
    # Auto axes: logically-annotated layers let XLA place intermediate collectives.
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of distinct batch slices: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_sharding(mesh: Mesh, logical_specs):
    """NamedShardings for a pytree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def unboxed(tree):
    """`tree` with each logically partitioned leaf replaced by its value, without applying a
    sharding constraint (so it works on shapes, inside a mesh or not)."""
    boxed = lambda leaf: isinstance(leaf, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(
        lambda leaf: leaf.unbox(apply_constraint=False) if boxed(leaf) else leaf,
        tree,
        is_leaf=boxed,
    )


def check_divisible(shapes, logical_specs, mesh: Mesh) -> None:
    """ConfigError naming the first array whose logically named dimension does not split over
    the mesh axes the rules map it to (e.g. 3 attention heads over mesh.model=2)."""
    rules = dict(LOGICAL_RULES)
    specs = jax.tree_util.tree_leaves_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    for (path, spec), leaf in zip(specs, jax.tree.leaves(shapes), strict=True):
        for dim, name in enumerate(spec or ()):
            axes = rules.get(name) if isinstance(name, str) else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(mesh.shape[axis] for axis in axes)
            if size > 1 and leaf.shape[dim] % size:
                where = ", ".join(f"mesh.{axis}={mesh.shape[axis]}" for axis in axes)
                name_path = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
                raise ConfigError(
                    f"config.mesh: {name_path} has {leaf.shape[dim]} "
                    f"'{name}' (dimension {dim}), which do not split over {where}; use mesh "
                    "sizes that divide it."
                )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading dimension over the batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch that this process's devices hold: the examples its
    input reads. ConfigError if they are not one contiguous range (a mesh whose device order
    interleaves the processes along the batch)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    spans = sorted({index[0].indices(global_batch)[:2] for index in indices.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(stop - start for start, stop in spans) != hi - lo:
        raise ConfigError(
            f"config.mesh: process {jax.process_index()}'s devices hold rows {spans} of the "
            "batch, not one range; build the mesh from jax.devices() in order (the default)."
        )
    return lo, hi


def to_global(batch, mesh: Mesh, global_batch: int):
    """Place this process's rows (see `process_rows`) of a batch (dict of numpy arrays) as
    global arrays of `global_batch` rows."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:])),
        batch,
    )


def gather_objects(obj) -> list:
    """Every process's `obj` (anything picklable), in process order; `[obj]` for one process.
    A collective: every process must call it."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([len(data)], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    blobs = multihost_utils.process_allgather(padded)
    return [
        pickle.loads(blob[: int(size[0])].tobytes())
        for blob, size in zip(blobs, sizes, strict=True)
    ]
