"""The train state, the one jitted update for every objective, and `build`: the objective,
its model and optimizer, the state's sharded init and the compiled step for a config.

Below the trainer, so that what only needs a state's shapes (loading a workdir, evaluating a
checkpoint, the benchmarks) does not import the training loop."""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clipjax import objectives, optimizers, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of updates applied
    params: Any
    model_state: Any  # non-parameter model collections (BatchNorm statistics); {} for a ViT
    opt_state: Any
    objective_state: Any  # e.g. DeCLIP's feature queue; {} for CLIP
    rng: jax.Array  # base key; step keys are fold_in(rng, step)


def train_step(state: TrainState, batch, *, objective, optimizer, schedule):
    """One update. Returns the new state and this step's scalar metrics.

    A step whose loss, gradient norm or update norm is not finite is not applied: the state only
    counts the step, and `train/nonfinite` is 1.

    Besides the objective's inputs, `batch` may hold what each process knows alone: `skipped`
    (bad records the input dropped before each row) and `control` int32 (rows, 2) (a stop
    signal arrived; a timed save is due). Their totals over the global batch come back as
    `data/skipped`, `control/stop` and `control/save`, the same on every process, so that all
    processes stop or save at the same step."""
    batch = dict(batch)
    host = {key: batch.pop(key) for key in ("skipped", "control") if key in batch}
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (loss, (metrics, model_state, objective_state)), grads = grad_fn(
        state.params, state.model_state, batch, state.objective_state, rng
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    grad_norm = optax.global_norm(grads)
    # A NaN or infinity anywhere makes its global norm non-finite; so does an update too large
    # for its norm to be represented, which is divergence too. (A per-leaf check compiles
    # several times slower on CPU.)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    updated = state.replace(
        params=objective.constrain(optax.apply_updates(state.params, updates)),
        model_state=model_state,
        opt_state=opt_state,
        objective_state=objective_state,
    )
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    metrics = {
        "train/loss": loss,
        "train/lr": schedule(state.step),
        "train/grad_norm": grad_norm,
        "train/nonfinite": 1 - finite.astype(jnp.int32),
        **metrics,
    }
    if "skipped" in host:
        metrics["data/skipped"] = jnp.sum(host["skipped"])
    if "control" in host:
        metrics["control/stop"], metrics["control/save"] = jnp.max(host["control"], axis=0)
    return new_state.replace(step=state.step + 1), metrics


def build(config, mesh):
    """Model, objective, optimizer, the state's init function, abstract state and shardings."""
    objective = objectives.get(config.objective)(config, mesh)
    schedule = optimizers.make_schedule(config.optim, config.total_steps)
    optimizer = optimizers.make_optimizer(config.optim, schedule)
    size, length = config.model.image.size, config.model.text.context_length

    def init_boxed(rng):
        params_rng, objective_rng, state_rng = jax.random.split(rng, 3)
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        tokens = jnp.zeros((1, length), jnp.int32)
        variables = objective.model.init(params_rng, images, tokens)
        params = variables.pop("params")
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=variables,
            opt_state=optimizer.init(params),
            objective_state=objective.init_state(objective_rng),
            rng=state_rng,
        )

    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    abstract_values = sharding.unboxed(abstract_boxed)
    logical_specs = nn.get_partition_spec(abstract_boxed)
    sharding.check_divisible(abstract_values, logical_specs, mesh)
    state_sharding = sharding.logical_sharding(mesh, logical_specs)
    init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=state_sharding)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_values,
        state_sharding,
    )
    step_fn = jax.jit(
        functools.partial(train_step, objective=objective, optimizer=optimizer, schedule=schedule),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return objective, init, abstract_state, step_fn
