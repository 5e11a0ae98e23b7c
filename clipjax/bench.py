r"""Benchmark the real train step of a config.

  python -m clipjax.bench --config=configs/clip_vitb32.py:local
  python -m clipjax.bench --config=configs/clip_vitb32.py --config.batch_size=32 --steps=5

Times the jitted train step on synthetic inputs of the config's shapes, after compilation,
and prints the median over `--steps` steps. The last line is one JSON object:
  samples_per_s, step_s        median step time and the throughput it gives
  flops_per_sample             XLA's cost analysis of the compiled step (flops_source says so)
  mfu                          achieved flop rate / matmul peak measured here, all devices
  matmul_peak_flops_per_s      per device: median of a jitted 2048² matmul in the config's
                               precision (float32, or `model.dtype` operands with float32
                               accumulation), `matmul_peak_dtype`
  compile_s                    XLA compile time of the train step
  temp_bytes_per_device        scratch memory of the compiled step (memory analysis)
For every objective but CLIP it adds CLIP's step on the same backbone and batch
(`step_ratio_vs_clip`); for DeCLIP and DeFILIP the time of the two nearest-neighbour queue
lookups alone (`nn_lookup_s`, `nn_lookup_share`).

With `--loss_only`, only the contrastive losses are compiled (value and gradient with respect
to the embeddings, `config.model.embed_dim` wide) at each of `--batch_sizes`, and the JSON maps
each loss to its `temp_bytes_per_device` per global batch, next to the logits floors
(B/k)·B·4 bytes (all-gather) and (B/k)²·4 bytes (ring); for FILIP and DeFILIP also the
token-wise loss (`filip_allgather`, `filip_ring`, see `tools.loss_memory`). For 8 devices on
one CPU:

  python -m clipjax.bench --config=configs/siglip_vitb16.py --loss_only --fake_devices=8

With `--compile_only`, the train step is lowered and compiled from the state's shapes alone
(no state is allocated, so any model size works) and the JSON gives `lower_s`,
`compile_s`, `temp_bytes_per_device` and the parameter count. ViT-H/14 at open_clip's shapes,
with its blocks scanned:

  python -m clipjax.bench --config=configs/clip_vitb32.py --compile_only \
      --config.model.image.variant=H/14 --config.model.embed_dim=1024 \
      --config.model.text.width=1024 --config.model.text.heads=16 \
      --config.model.text.depth=24 --config.model.scan_layers=True

With `--profile=DIR`, `--steps` steps are traced with `jax.profiler` into DIR (TensorBoard's
profile plugin or Perfetto open it) instead of timed, and the JSON says where the time went:
thunk seconds per step and their share by category (matmul, scatter, reduction, layout,
collective, elementwise) and the costliest HLO instructions with the JAX op each came from:

  python -m clipjax.bench --config=configs/clip_vitb32.py --config.batch_size=32 --steps=2 \
      --profile=/tmp/trace_b32

With `--loop`, the real `train.run` loop (checkpoints, metrics, the host's bookkeeping; no
evaluations) trains on one synthetic batch already on the devices, and the bare compiled step
runs on the same batch in the same process: both are timed over windows of `--steps` // 5
steps (the first loop window, which compiles, left out), and the JSON gives both medians,
`loop_samples_per_s` and `bare_samples_per_s`, and their ratio `loop_over_bare`:

  python -m clipjax.bench --config=configs/clip_vitb32.py:local --loop --steps=100

With `--data_only` (or `--data-only`), only the config's real training input pipeline runs (its
source, workers, views and batch; the tokenizer trained in a temporary directory as the trainer
does, or `config.data.tokenizer.path`): after `--warmup_batches`, `--steps` batches are timed in
5 windows, and the JSON gives `images_per_s` (the median window's rate) with `batch_size`,
`num_workers`, `source` and `image_bytes_per_example` (what an example's image views send to
the devices: uint8, 1 byte per channel value):

  python -m clipjax.bench --config=configs/clip_vitb32.py:local --data_only --steps=50
"""

import json
import os
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import PartitionSpec
from ml_collections import config_flags

from clipjax import config as config_lib
from clipjax import metrics, nn_queue, objectives, sharding, step, train
from clipjax.data import sources
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.models import precision
from clipjax.objectives.base import Views
from clipjax.tools import loss_memory, step_profile

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when the command runs, so other tools can import this module."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file (`path.py[:arg]`).", lock_config=True
    )
    flags.DEFINE_integer("steps", 10, "Timed steps after the first (compiling) one.")
    flags.DEFINE_bool("loss_only", False, "Compile only the losses on embeddings; report memory.")
    flags.DEFINE_list(
        "batch_sizes", ["4096", "8192", "16384", "32768"], "Global batches, loss_only."
    )
    flags.DEFINE_integer("fake_devices", 0, "On CPU, split the host into this many devices.")
    flags.DEFINE_bool("data_only", False, "Time only the training input pipeline (images/s).")
    flags.DEFINE_string(
        "profile", "", "Trace --steps steps into this directory; report time by HLO category."
    )
    flags.DEFINE_bool("compile_only", False, "Only lower and compile the train step; report times.")
    flags.DEFINE_integer("warmup_batches", 10, "data_only: batches read before timing.")
    flags.DEFINE_bool("loop", False, "Time train.run's loop against the bare step, same batch.")
    flags.mark_flags_as_required(["config"])


def _median_seconds(runs, repeats: int, block: int = 5) -> list[float]:
    """The median seconds of each of `runs` (their results waited for) over `repeats` timed
    calls each, taken in turns of `block` calls: a change in the machine's load reaches every
    run alike, so their ratios hold. Each turn starts with one untimed call, so each run is
    timed with its own program and data back in the caches, as in training."""
    times = [[] for _ in runs]
    while len(times[0]) < repeats:
        for run, seconds in zip(runs, times, strict=True):
            jax.block_until_ready(run())
            for _ in range(min(block, repeats - len(seconds))):
                start = time.perf_counter()
                jax.block_until_ready(run())
                seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in times]


def matmul_peak(dtype="float32", size: int = 2048, repeats: int = 10) -> float:
    """Matmul flop/s of one device in the precision policy of `dtype` (float32; or operands in
    `dtype` accumulated in float32), median over repeats."""
    a = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
    matmul = jax.jit(lambda x: precision.einsum("ij,jk->ik", x, x, dtype))
    jax.block_until_ready(matmul(a))
    return 2 * size**3 / _median_seconds([lambda: matmul(a)], repeats)[0]


def synthetic_batch(config, mesh, views: Views) -> dict:
    """Random values for the batch the trainer feeds for `views` (`step.abstract_batch`: uint8
    images, token ids, MLM labels at 15% of positions, no stop or save), on the mesh."""
    rng = np.random.default_rng(0)
    vocab = config.model.text.vocab_size

    def fill(key: str, shape: tuple, dtype) -> np.ndarray:
        if dtype == np.uint8:
            return rng.integers(0, 256, shape, np.uint8)
        if key == "control":
            return np.zeros(shape, np.int32)
        tokens = rng.integers(4, vocab, size=shape).astype(np.int32)
        return np.where(rng.random(shape) < 0.15, tokens, 0) if key == "mlm_labels" else tokens

    lo, hi = sharding.process_rows(mesh, config.batch_size)
    batch = {
        key: fill(key, x.shape, x.dtype)[lo:hi]
        for key, x in step.abstract_batch(config, mesh, views).items()
    }
    return sharding.to_global(batch, mesh, config.batch_size)


def compiled_step(config):
    """`config`'s train step compiled for synthetic inputs: (step, state, batch, compile s)."""
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, init, _, step_fn = step.build(config, mesh)
        state = init(jax.random.PRNGKey(config.seed))
        batch = synthetic_batch(config, mesh, objective.views)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
    return compiled, state, batch, time.perf_counter() - start


def _stepper(config):
    """(one step of `config`'s train step, compile seconds, the compiled step), warmed up."""
    compiled, state, batch, compile_s = compiled_step(config)

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        return state, metrics

    jax.block_until_ready(run())  # warm-up
    return run, compile_s, compiled


class _Resident(grain.DatasetIterator):
    """One global batch on the devices, handed out forever; its position counts batches."""

    def __init__(self, batch: dict):
        super().__init__()
        self._batch, self._batches = batch, 0

    def __next__(self) -> dict:
        self._batches += 1
        return self._batch

    def get_state(self) -> dict:
        return {"batches": self._batches}

    def set_state(self, state: dict) -> None:
        self._batches = state["batches"]


_WINDOWS = 5


def loop_overhead(config, steps: int) -> dict:
    """samples/s of `train.run`'s loop and of the bare compiled step on the same resident
    batch, medians over windows of `steps` // 5 steps, in this process (the bare step before
    and after the loop)."""
    window = max(1, steps // _WINDOWS)
    compiled, state, batch, _ = compiled_step(config)
    state, _ = compiled(state, batch)  # warm-up

    def bare_rates() -> list[float]:
        nonlocal state
        rates = []
        for _ in range(_WINDOWS):
            start = time.perf_counter()
            for _ in range(window):
                state, step_metrics = compiled(state, batch)
            jax.block_until_ready((state, step_metrics))
            rates.append(window * config.batch_size / (time.perf_counter() - start))
        return rates

    bare = bare_rates()
    loop_config = config.copy_and_resolve_references()
    loop_config.total_steps = window * (_WINDOWS + 1)
    loop_config.log_every, loop_config.ckpt_every = window, 10**9
    loop_config.eval_every, loop_config.evals = 10**9, {}
    resident = {key: value for key, value in batch.items() if key != "control"}
    with tempfile.TemporaryDirectory() as workdir:
        train.run(loop_config, workdir, input_batches=_Resident(resident))
        rows, _ = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    rates = {
        row["step"]: row["train/samples_per_s"] for row in rows if "train/samples_per_s" in row
    }
    loop = [rate for at, rate in sorted(rates.items()) if at > window]
    bare += bare_rates()
    result = {
        "loop_samples_per_s": statistics.median(loop),
        "bare_samples_per_s": statistics.median(bare),
        "window_steps": window,
        "loop_window_samples_per_s": loop,
        "bare_window_samples_per_s": bare,
        "batch_size": config.batch_size,
        "dtype": config.model.dtype,
    }
    result["loop_over_bare"] = result["loop_samples_per_s"] / result["bare_samples_per_s"]
    return result


def compile_times(config) -> dict:
    """Lower and compile `config`'s train step from abstract shapes: nothing is allocated."""
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, _, abstract_state, step_fn = step.build(config, mesh)
        batch = synthetic_batch(config, mesh, objective.views)  # small: only the state is big
        start = time.perf_counter()
        lowered = step_fn.lower(abstract_state, batch)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    return {
        "image_variant": config.model.image.variant,
        "scan_layers": bool(config.model.scan_layers),
        "remat": config.model.remat,
        "dtype": config.model.dtype,
        "params": sum(x.size for x in jax.tree.leaves(abstract_state.params)),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
    }


def nn_lookup_seconds(config, repeats: int = 10) -> float:
    """Median time of DeCLIP's two queue lookups (both text views) at the config's sizes."""
    mesh = sharding.make_mesh(config.mesh)
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    dim = config.model.embed_dim
    texts = jax.device_put(
        unit(rng.normal(size=(config.batch_size, dim))).astype(np.float32),
        sharding.batch_sharding(mesh),
    )
    queue = jax.device_put(
        unit(rng.normal(size=(config.declip.queue_size, dim))).astype(np.float32),
        sharding.batch_sharding(mesh),
    )
    batched = PartitionSpec(sharding.BATCH_AXES)

    def two_lookups(t, q):
        return [nn_queue.lookup(x, q, sharding.BATCH_AXES) for x in (t, t)]

    lookup = jax.jit(
        jax.shard_map(two_lookups, mesh=mesh, in_specs=(batched, batched), out_specs=batched)
    )
    jax.block_until_ready(lookup(texts, queue))
    return _median_seconds([lambda: lookup(texts, queue)], repeats)[0]


def profile(config, steps: int, trace_dir: str) -> dict:
    """Trace `steps` train steps (after a warm-up) into `trace_dir`, and where the time went:
    thunk seconds per step by category and the costliest HLO instructions
    (`clipjax.tools.step_profile`)."""
    run, _, compiled = _stepper(config)
    summary = step_profile.profile(
        lambda: jax.block_until_ready(run()), steps, trace_dir, compiled.as_text()
    )
    return {"trace_dir": trace_dir, **summary}


def benchmark(config, steps: int) -> dict:
    mesh = sharding.make_mesh(config.mesh)
    data_parallel = sharding.data_parallel_size(mesh)
    if config.batch_size % data_parallel:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} does not split over {data_parallel} devices."
        )
    run, compile_s, compiled = _stepper(config)
    runs = [run]
    if config.objective != "clip":
        # CLIP's step on the same backbone and batch, timed in the same run, step for step.
        clip = config.copy_and_resolve_references()
        clip.objective = "clip"
        clip_run, clip_compile_s, _ = _stepper(clip)
        runs.append(clip_run)
    step_s, *clip_step_s = _median_seconds(runs, steps)
    # The compiled module is one device's program: its flops are per device.
    flops_per_step = compiled.cost_analysis()["flops"] * jax.device_count()
    peak = matmul_peak(config.model.dtype)
    result = {
        "config_batch_size": config.batch_size,
        "devices": jax.device_count(),
        "samples_per_s": config.batch_size / step_s,
        "step_s": step_s,
        "flops_per_sample": flops_per_step / config.batch_size,
        "flops_source": "xla_cost_analysis",
        "mfu": flops_per_step / step_s / (peak * jax.device_count()),
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_dtype": config.model.dtype,
        "compile_s": compile_s,
        "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
    }
    if clip_step_s:
        result["clip_step_s"] = clip_step_s[0]
        result["clip_compile_s"] = clip_compile_s
        result["step_ratio_vs_clip"] = step_s / clip_step_s[0]
    if config.objective in ("declip", "defilip"):
        lookup_s = nn_lookup_seconds(config)
        result["nn_lookup_s"] = lookup_s
        result["nn_lookup_share"] = lookup_s / step_s
    return result


_DATA_WINDOWS = 5


def data_throughput(config, batches: int, warmup_batches: int) -> dict:
    """Images/s of `config`'s training input pipeline alone: the median over 5 windows of
    `batches` // 5 batches each, read after `warmup_batches`."""
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = tokenizer_lib.load_or_train(
            config.data.tokenizer, workdir, sources.captions(config.data.train)
        )
    views = objectives.get(config.objective)(config, sharding.make_mesh(config.mesh)).views
    data = train.input_pipeline(config, tokenizer, views)
    per_window = max(1, batches // _DATA_WINDOWS)
    rates = []
    iterator = iter(data)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        for _ in range(_DATA_WINDOWS):
            start, images = time.perf_counter(), 0
            for _ in range(per_window):
                batch = next(iterator)
                images += len(batch["image"])
            rates.append(images / (time.perf_counter() - start))
    finally:
        iterator.close()
    views = [key for key in batch if key.startswith("image")]
    return {
        "images_per_s": statistics.median(rates),
        "window_images_per_s": rates,
        # What each example's image views send to the devices.
        "image_bytes_per_example": sum(batch[key][0].nbytes for key in views),
        "batch_size": config.batch_size // jax.process_count(),
        "num_workers": config.data.num_workers,
        "source": config.data.train,
        "image_size": config.model.image.size,
        "timed_batches": per_window * _DATA_WINDOWS,
    }


def main(argv) -> None:
    del argv
    if FLAGS.fake_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.fake_devices)
    if FLAGS.data_only:
        result = data_throughput(FLAGS.config, FLAGS.steps, FLAGS.warmup_batches)
    elif FLAGS.compile_only:
        result = compile_times(FLAGS.config)
    elif FLAGS.loop:
        result = loop_overhead(FLAGS.config, FLAGS.steps)
    elif FLAGS.profile:
        result = profile(FLAGS.config, FLAGS.steps, FLAGS.profile)
    elif FLAGS.loss_only:
        result = loss_memory.loss_memory(FLAGS.config, [int(b) for b in FLAGS.batch_sizes])
    else:
        result = benchmark(FLAGS.config, FLAGS.steps)
    logging.info("%s", result)
    print(json.dumps(result))


if __name__ == "__main__":
    # absl spells flags with underscores; accept the dashed --data-only too.
    sys.argv = [
        {"--data-only": "--data_only", "--nodata-only": "--nodata_only"}.get(a, a) for a in sys.argv
    ]
    define_flags()
    app.run(main)
