"""The train state, the one jitted update for every objective, and `build`: the objective,
its model and optimizer, the state's sharded init and the compiled step for a config.

Below the trainer, so that what only needs a state's shapes (loading a workdir, evaluating a
checkpoint, the benchmarks) does not import the training loop."""

import functools
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clipjax import objectives, optimizers, sharding
from clipjax.errors import ConfigError
from clipjax.models import layers
from clipjax.models.vit import vit_size


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of updates applied
    params: Any
    model_state: Any  # non-parameter model collections (BatchNorm statistics); {} for a ViT
    opt_state: Any
    objective_state: Any  # e.g. DeCLIP's feature queue; {} for CLIP
    rng: jax.Array  # base key; step keys are fold_in(rng, step)


def _micro_batches(x, steps: int):
    """(B, ...) -> (steps, B / steps, ...): micro-batch j holds rows j, j + steps, ..., so that
    each device's share of the batch splits evenly over the micro-batches."""
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)


def _whole_batch(x):
    """The inverse of `_micro_batches`."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _stop_frozen(params, frozen):
    """`params` with the frozen leaves (`frozen`: a pytree of bools, or None) cut from the
    gradient, so that no backward pass runs through a locked tower."""
    if frozen is None:
        return params
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def accumulated_grads(objective, params, model_state, batch, state, rng, steps: int, frozen=None):
    """The loss of an `EmbeddingObjective` over the whole batch and its gradient, computed
    `steps` micro-batches at a time (GradCache, Gao et al. 2021): the same values as
    `jax.value_and_grad(objective.loss)`, with one micro-batch's activations alive at a time.

    1. Embed every micro-batch, keeping no activations (a scan).
    2. The loss and its gradient with respect to the embeddings, over the whole batch: every
       negative, all-gathered as in an un-accumulated step.
    3. Run each micro-batch's towers again and pull that gradient back through them (a `vjp`
       per micro-batch, in a scan), summing the parameter gradients.
    The towers' model_state (BatchNorm) is not updated: `build` refuses accumulation there.
    Returns ((loss, (metrics, model_state, state)), grads)."""
    micro = jax.tree.map(lambda x: _micro_batches(x, steps), batch)
    keys = jax.random.split(rng, steps)  # the same random choices in both passes

    def embed(p, micro_batch, key):
        return objective.embed(_stop_frozen(p, frozen), model_state, micro_batch, key)[0]

    def contrast(p, embeddings, state):
        return objective.contrast(_stop_frozen(p, frozen), embeddings, state)

    _, embeddings = jax.lax.scan(lambda _, xs: (None, embed(params, *xs)), None, (micro, keys))
    (loss, (metrics, state)), (grads, embed_grads) = jax.value_and_grad(
        contrast, argnums=(0, 1), has_aux=True
    )(params, jax.tree.map(_whole_batch, embeddings), state)

    def pull_back(total, xs):
        micro_batch, key, cotangent = xs
        _, pullback = jax.vjp(lambda p: embed(p, micro_batch, key), params)
        return jax.tree.map(jnp.add, total, pullback(cotangent)[0]), None

    cotangents = jax.tree.map(lambda g: _micro_batches(g, steps), embed_grads)
    grads, _ = jax.lax.scan(pull_back, grads, (micro, keys, cotangents))
    return (loss, (metrics, model_state, state)), grads


def train_step(
    state: TrainState, batch, *, objective, optimizer, schedule, accum_steps=1, frozen=None
):
    """One update. Returns the new state and this step's scalar metrics.

    A step whose loss, gradient norm or update norm is not finite is not applied: the state only
    counts the step, and `train/nonfinite` is 1.

    Besides the objective's inputs, `batch` may hold what each process knows alone: `skipped`
    (bad records the input dropped before each row) and `control` int32 (rows, 2) (a stop
    signal arrived; a timed save is due). Their totals over the global batch come back as
    `data/skipped`, `control/stop` and `control/save`, the same on every process, so that all
    processes stop or save at the same step.

    With `accum_steps` > 1 the gradient is accumulated over that many micro-batches
    (`accumulated_grads`). The parameters where the pytree of bools `frozen` is True get no
    gradient (no backward pass runs through them) and stay bitwise as they are."""
    batch = dict(batch)
    host = {key: batch.pop(key) for key in ("skipped", "control") if key in batch}
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps > 1:
        grad_fn = functools.partial(accumulated_grads, objective, steps=accum_steps, frozen=frozen)
    else:
        grad_fn = jax.value_and_grad(
            lambda p, *args: objective.loss(_stop_frozen(p, frozen), *args), has_aux=True
        )
    (loss, (metrics, model_state, objective_state)), grads = grad_fn(
        state.params, state.model_state, batch, state.objective_state, rng
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    grad_norm = optax.global_norm(grads)
    # A NaN or infinity anywhere makes its global norm non-finite; so does an update too large
    # for its norm to be represented, which is divergence too. (A per-leaf check compiles
    # several times slower on CPU.)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    params = objective.constrain(optax.apply_updates(state.params, updates))
    if frozen is not None:  # bitwise: not even a -0.0 + 0.0
        params = jax.tree.map(lambda new, old, f: old if f else new, params, state.params, frozen)
    updated = state.replace(
        params=params,
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


def attention_for_mesh(config, mesh):
    """`config` with `model.attention="auto"` resolved to the kernel the mesh's devices take
    (`layers.choose_attention`): a step compiled for GPUs from a CPU host gets cuDNN's."""
    model = config.model
    if model.attention != "auto":
        return config
    head_dims = [model.text.width // model.text.heads]
    if not model.image.variant.startswith("RN"):  # a ResNet's attention pool is not `attend`
        width, _, _, heads, _ = vit_size(model.image.variant)
        head_dims.append(width // heads)
    platform = mesh.devices.flat[0].platform
    chosen = layers.choose_attention("auto", model.dtype, platform, tuple(head_dims))
    resolved = config.copy_and_resolve_references()
    resolved.model.attention = chosen
    return resolved


def build(config, mesh):
    """Model, objective, optimizer, the state's init function, abstract state and shardings,
    for the devices of `mesh` (which may be abstract: nothing here runs on them)."""
    config = attention_for_mesh(config, mesh)
    objective = objectives.get(config.objective)(config, mesh)
    schedule = optimizers.make_schedule(config.optim, config.total_steps)
    frozen = optimizers.frozen_pattern(config)
    try:
        optimizer = optimizers.make_optimizer(config.optim, schedule, frozen)
        re.compile(frozen)
    except re.error as e:
        raise ConfigError(
            f"config.optim.frozen={config.optim.frozen!r} is not a regex ({e})."
        ) from None
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

    # An abstract key: a concrete one would run on the mesh's devices, which a compile for
    # another platform (clipjax.plan) does not have.
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    abstract_boxed = _unbox_masked(jax.eval_shape(init_boxed, key))
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
    _check_accumulation(config, objective, abstract_values)
    mask = optimizers.frozen_mask(abstract_values.params, frozen)
    if frozen and not any(jax.tree.leaves(mask)):
        tops = sorted(
            {name.split("/")[0] for name in optimizers.param_names(abstract_values.params)}
        )
        raise ConfigError(
            f"config.optim.frozen={config.optim.frozen!r} matches no parameter. Names are "
            f"'/'-joined paths starting with {', '.join(tops)} (a tower: 'image_tower/.*')."
        )
    step_fn = jax.jit(
        functools.partial(
            train_step,
            objective=objective,
            optimizer=optimizer,
            schedule=schedule,
            accum_steps=config.accum_steps,
            frozen=mask if frozen else None,
        ),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return objective, init, abstract_state, step_fn


def abstract_batch(config, mesh, views) -> dict:
    """The global batch the trainer feeds the step, as sharded shapes: the keys and dtypes
    `data.views.Views` names (uint8 images, texts, MLM labels) plus the host's `control`
    rows."""
    n, size = config.batch_size, config.model.image.size
    image = jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8)
    text = jax.ShapeDtypeStruct((n, config.model.text.context_length), jnp.int32)
    shapes = dict.fromkeys(views.image_keys, image)
    for kind in views.text_views:
        shapes["text" if kind == "plain" else f"text_{kind}"] = text
        if kind == "mlm":
            shapes["mlm_labels"] = text
    shapes["control"] = jax.ShapeDtypeStruct((n, 2), jnp.int32)
    batch_sharding = sharding.batch_sharding(mesh)
    return {
        key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding)
        for key, x in shapes.items()
    }


def _unbox_masked(tree):
    """`tree` without the logical boxes around optax's `MaskedNode`s: the moments a frozen
    parameter does not have keep its box, which would give a sharding to an empty node."""

    def unbox(x):
        masked = isinstance(x, nn.LogicallyPartitioned) and isinstance(x.value, optax.MaskedNode)
        return x.value if masked else x

    return jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _check_accumulation(config, objective, abstract_state) -> None:
    """ConfigError unless `config.accum_steps` micro-batches give exactly the batch's
    gradient."""
    if config.accum_steps == 1:
        return
    reason, way_out = objective.no_accumulation, "config.accum_steps=1"
    if not reason and jax.tree.leaves(abstract_state.model_state):
        reason = "the image tower's BatchNorm statistics would be each micro-batch's"
        way_out += " or a ViT image tower"
    if reason:
        raise ConfigError(
            f"config.accum_steps={config.accum_steps}: {config.objective} cannot accumulate its "
            f"gradient exactly, as {reason}; use {way_out}."
        )
