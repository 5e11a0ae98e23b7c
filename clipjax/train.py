"""The trainer: one loop over the jitted step (`clipjax.step`) for every objective.

Sections: config checks → mesh → the compiled step → tokenizer and input → state (restored,
initialised or loaded) → loop (step, log, evaluate, save).
"""

import contextlib
import functools
import json

import flax.linen as nn
import jax
from absl import logging

from clipjax import bookkeeping, checkpoint, objectives, paths, sharding
from clipjax import config as config_lib
from clipjax.data import pipeline, sources
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.data.prefetch import DevicePrefetch
from clipjax.errors import Interrupted, TrainingError
from clipjax.evaluate import evaluator as evaluator_lib
from clipjax.lock import workdir_lock
from clipjax.metrics import MetricsWriter, Progress
from clipjax.step import build


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


def run(config, workdir: str, *, stop_at: int | None = None, input_batches=None) -> dict:
    """Train (or resume) in `workdir` until `config.total_steps`, or until step `stop_at`.
    Returns the chance level of each evaluation metric where one is known (for the closing
    summary, `clipjax.summary.training`).

    SIGTERM or SIGINT ends the current step and the next, saves a checkpoint and raises
    `Interrupted`. `input_batches` replaces the config's input with an iterator of global
    batches already on the devices (a Grain iterator, for its position: `clipjax.bench`)."""
    # ---- Config checks, before anything compiles ----
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate(config, workdir, sharding.data_parallel_size(mesh))
    lock = workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        return _train(config, workdir, mesh, stop_at, input_batches)


def _start(config, workdir: str, mesh, input_batches):
    """Objective, step, checkpointer, evaluators, the batches on the devices (restored to the
    checkpoint's position) and the state: restored, initialised, or loaded (`init_from`)."""
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts)
    try:
        if ckpt.latest_step() is not None:
            config_lib.check_resume(config, workdir)
        objective, init, abstract_state, step_fn = build(config, mesh)
        ckpt.check_compatible(abstract_state)
    except config_lib.ConfigError:
        ckpt.close()
        raise
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

    try:
        state = ckpt.restore(
            abstract_state, train_iter, allow_changed_data=config.data.allow_changed
        )
    except config_lib.ConfigError:  # a position that cannot move, or one into other data
        ckpt.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
        raise
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


def _train(config, workdir: str, mesh, stop_at: int | None, input_batches) -> dict:
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
        return evaluator_lib.chance_all(evaluators)
    finally:
        writer.close()
        if hasattr(batches, "close"):
            batches.close()
        ckpt.close()  # last: it raises if the last save failed


def _logged_row(book: bookkeeping.Bookkeeper, done: bookkeeping.Finished, progress) -> dict:
    row = book.row(done)
    if rate := progress.log(done.step, row["train/loss"]):
        row["train/samples_per_s"] = rate
    return row
