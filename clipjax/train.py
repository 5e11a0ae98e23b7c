"""The trainer: one loop and one jitted step for every objective.

Sections: config checks → mesh → objective and model → tokenizer and input → state (sharded at
init) → restore → compile → loop (step, metrics, evals, checkpoints).
"""

import contextlib
import functools
import json
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from clipjax import bookkeeping, checkpoint, objectives, optimizers, paths, sharding
from clipjax import config as config_lib
from clipjax.data import pipeline, sources
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.data.prefetch import DevicePrefetch
from clipjax.errors import Interrupted, TrainingError
from clipjax.evaluate import evaluator as evaluator_lib
from clipjax.lock import workdir_lock
from clipjax.metrics import MetricsWriter, Progress


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


def input_pipeline(config, tokenizer, views: objectives.base.Views, mesh=None):
    """This process's stream of training batches for `config` (see `pipeline.train_dataset`):
    the rows of each global batch that its devices in `mesh` hold (default: all rows)."""
    rows = sharding.process_rows(mesh, config.batch_size) if mesh is not None else None
    return pipeline.train_dataset(
        config.data,
        tokenizer=tokenizer,
        image_size=config.model.image.size,
        context_length=config.model.text.context_length,
        global_batch_size=config.batch_size,
        seed=config.seed,
        views=views,
        rows=rows,
    )


def _tokenizer(config, workdir: str, loaded_model):
    """The run's tokenizer: loaded, trained, or the loaded model's own, made and saved in the
    workdir by process 0 and sent to the others, so that every process encodes alike."""
    tokenizer = None
    if jax.process_index() == 0:
        if loaded_model and not config.data.tokenizer.path:  # the loaded model's own
            tokenizer = tokenizer_lib.save(loaded_model.tokenizer, workdir)
        else:
            tokenizer = tokenizer_lib.load_or_train(
                config.data.tokenizer, workdir, sources.captions(config.data.train)
            )
    return sharding.gather_objects(tokenizer)[0]


def _save_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        text = config.to_json_best_effort(indent=2)
        paths.write_atomic(paths.path(workdir) / "config.json", text.encode())


def _diverged(step: int, count: int, ckpt: checkpoint.Checkpointer) -> TrainingError:
    latest = ckpt.latest_step()
    last = f"{ckpt.directory}/{latest}" if latest is not None else "none yet"
    return TrainingError(
        f"stopped at step {step}: {count} steps in a row had a non-finite loss, gradient or "
        "update "
        f"(config.max_nonfinite_steps={count}), and none of them was applied. The last good "
        f"checkpoint is {last}; lower config.optim.lr (or raise config.optim.warmup_steps) and "
        "run again to resume from it."
    )


def run(config, workdir: str, *, stop_at: int | None = None, input_batches=None) -> None:
    """Train (or resume) in `workdir` until `config.total_steps`, or until step `stop_at`.

    SIGTERM or SIGINT ends the current step and the next, saves a checkpoint and raises
    `Interrupted`. `input_batches` replaces the config's input with an iterator of global
    batches already on the devices (a Grain iterator, for its position: `clipjax.bench`)."""
    # ---- Config checks, before anything compiles ----
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate(config, workdir, sharding.data_parallel_size(mesh))
    lock = workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        _train(config, workdir, mesh, stop_at, input_batches)


def _start(config, workdir: str, mesh, input_batches):
    """Objective, step, checkpointer, evaluators, the batches on the devices (restored to the
    checkpoint's position) and the state: restored, initialised, or loaded (`init_from`)."""
    objective, init, abstract_state, step_fn = build(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts)
    ckpt.check_compatible(abstract_state)
    _save_config(config, workdir)

    loaded_model = None
    if config.init_from and ckpt.latest_step() is None:
        from clipjax import inference  # only runs that start from weights need it

        loaded_model = inference.load(config.init_from)
    tokenizer = _tokenizer(config, workdir, loaded_model)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise config_lib.ConfigError(
            f"config.model.text.vocab_size={config.model.text.vocab_size} is smaller than "
            f"the tokenizer's {tokenizer.vocab_size} pieces; raise it to at least "
            f"{tokenizer.vocab_size}."
        )
    try:
        if input_batches is None:
            train_iter = iter(input_pipeline(config, tokenizer, objective.views, mesh))
        else:
            train_iter = input_batches
        evaluators = evaluator_lib.make_evaluators(
            config, objective=objective, tokenizer=tokenizer, mesh=mesh
        )
    except ValueError as e:  # views the tokenizer cannot make; class lists that do not match
        raise config_lib.ConfigError(str(e)) from None

    state = ckpt.restore(abstract_state, train_iter)
    if state is None:
        state = init(jax.random.PRNGKey(config.seed))
        if loaded_model:
            variables = loaded_model.merge_into(
                {"params": state.params, **state.model_state}, config.model
            )
            state = state.replace(params=variables.pop("params"), model_state=variables)
    if input_batches is None:
        place = functools.partial(sharding.to_global, mesh=mesh, global_batch=config.batch_size)
        train_iter = DevicePrefetch(train_iter, place, config.data.device_prefetch)
    return step_fn, ckpt, evaluators, train_iter, state, loaded_model


def _train(config, workdir: str, mesh, stop_at: int | None, input_batches) -> None:
    if config.data.train.split(":")[0] in ("shapes", "glyphs") and input_batches is None:
        logging.info(
            "Training on a built-in dataset. For real data set --config.data.train "
            "to a source spec (see the README)."
        )
    step_fn, ckpt, evaluators, batches, state, loaded_model = _start(
        config, workdir, mesh, input_batches
    )
    first_step = int(state.step)
    last_step = min(config.total_steps, stop_at or config.total_steps)
    lo, hi = sharding.process_rows(mesh, config.batch_size)  # this process's rows
    writer = MetricsWriter(workdir)
    progress = Progress(config.total_steps, config.batch_size, first_step)

    def evaluate(step: int, label: str) -> None:
        results = evaluator_lib.run_all(evaluators, state.params, state.model_state)
        logging.info("step %d%s  %s", step, label, json.dumps(results))
        writer.write(step, results)

    try:
        if loaded_model and first_step == 0:  # where the loaded weights start from
            evaluate(0, f" ({config.init_from})")
        with bookkeeping.stop_signals() as signals:
            book = bookkeeping.Bookkeeper(
                max_nonfinite_steps=config.max_nonfinite_steps,
                ckpt_every_secs=config.ckpt_every_secs,
                signals=signals,
            )
            for step in range(first_step + 1, last_step + 1):
                control = sharding.to_global(book.control(hi - lo), mesh, config.batch_size)
                state, metrics = step_fn(state, {**next(batches), "control": control})
                if step == first_step + 1:
                    jax.block_until_ready(state)
                    progress = Progress(config.total_steps, config.batch_size, step)
                    logging.info("Compiled and ran the first step.")
                evaluating = step % config.eval_every == 0 or step == config.total_steps
                saving = step % config.ckpt_every == 0 or step == last_step
                for done in book.dispatched(step, metrics, wait=evaluating or saving):
                    if done.step % config.log_every == 0 or done.step == last_step or done.diverged:
                        writer.write(done.step, _logged_row(book, done, progress))
                    if done.diverged:
                        raise _diverged(done.step, done.nonfinite_run, ckpt)
                if evaluating:
                    evaluate(step, "")
                if saving or book.save_requested or book.stop_requested:
                    ckpt.save(step, state, batches)
                    book.saved(step)
                if book.stop_requested:  # a signal on any process stops every process here
                    ckpt.wait()
                    raise Interrupted(book.signal, step, f"{ckpt.directory}/{step}")
    finally:
        ckpt.close()
        writer.close()
        if hasattr(batches, "close"):
            batches.close()


def _logged_row(book: bookkeeping.Bookkeeper, done: bookkeeping.Finished, progress) -> dict:
    row = book.row(done)
    if rate := progress.log(done.step, row["train/loss"]):
        row["train/samples_per_s"] = rate
    return row
