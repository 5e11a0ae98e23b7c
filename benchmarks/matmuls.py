r"""The dense products of a config's CLIP train step, timed alone in XLA and in torch.

Where `vs_open_clip.py` says how far apart the two train steps are, this says how much of the
gap the matrix products alone explain. For every dense product of the towers (each block's
q, k, v and output projections and its two MLP layers, and the patch embedding), at the
config's exact shapes, it times the forward product and the two of the backward pass
(`tn,kn->tk` and `tk,tn->kn`, the second contracting over the tokens), in both libraries,
alternating, several rounds:

  XLA:   `clipjax.models.precision.einsum`, jitted, as the train step calls it: float32, or
         bfloat16 operands with float32 accumulation and result;
  torch: `torch.matmul` of (transposed) views, as autograd runs them, on float32, or on
         bfloat16 tensors (a bfloat16 result, as under `torch.autocast`).

Attention's two batched products per block, and everything that is not a product, are left
out. Each product's time, times the number of times one train step runs it, gives both
libraries' matmul milliseconds per step.

  pip install -r requirements.txt torch        # a separate virtualenv
  python benchmarks/matmuls.py --config=configs/clip_vitb32.py:local
  python benchmarks/matmuls.py --config=configs/clip_vitb32.py --config.batch_size=32

Prints a markdown table (GFLOP/s per shape and precision, both libraries) and last one JSON
line with the per-step totals.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipjax.models import precision  # noqa: E402
from clipjax.models.vit import vit_size  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (`path.py[:arg]`).", lock_config=True)
flags.DEFINE_integer("rounds", 5, "Alternating rounds (each library once per round).")
flags.DEFINE_integer("repeats", 10, "Timed calls of each product per library per round.")
flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Compute dtypes to time.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# The three products of one dense layer y = x·w, x (t, k), w (k, n): forward, d_x, d_w; and
# each as torch's autograd runs it, a matmul of (transposed) views.
PRODUCTS = {
    "tk,kn->tn": lambda a, b: a @ b,
    "tn,kn->tk": lambda a, b: a @ b.T,
    "tk,tn->kn": lambda a, b: a.T @ b,
}


def dense_shapes(config) -> list[tuple[str, int, int, int, int]]:
    """(name, t, k, n, count per step) of every dense product of the towers' forward pass."""
    batch = config.batch_size
    width, depth, mlp, _, patch = vit_size(config.model.image.variant)
    if config.model.image.depth > 0:
        depth = config.model.image.depth
    grid = config.model.image.size // patch
    image_tokens = batch * (grid * grid + 1)
    text = config.model.text
    text_tokens = batch * text.context_length
    return [
        ("patch embedding", batch * grid * grid, 3 * patch * patch, width, 1),
        ("image q, k, v, out", image_tokens, width, width, 4 * depth),
        ("image MLP up", image_tokens, width, mlp, depth),
        ("image MLP down", image_tokens, mlp, width, depth),
        ("text q, k, v, out", text_tokens, text.width, text.width, 4 * text.depth),
        ("text MLP up", text_tokens, text.width, 4 * text.width, text.depth),
        ("text MLP down", text_tokens, 4 * text.width, text.width, text.depth),
    ]


def _operands(spec: str, t: int, k: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    sizes = {"t": t, "k": k, "n": n}
    lhs, rhs = spec.split("->")[0].split(",")
    return tuple(rng.normal(size=[sizes[c] for c in s]).astype(np.float32) for s in (lhs, rhs))


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timers(spec: str, dtype: str, a: np.ndarray, b: np.ndarray):
    """(XLA call, torch call) of one product, warmed up; each returns once the result is."""
    jdtype = jnp.dtype(dtype)
    xa, xb = (jnp.asarray(x, jdtype) for x in (a, b))
    xla = jax.jit(lambda x, y: precision.einsum(spec, x, y, jdtype))
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ta, tb = (torch.from_numpy(x).to(tdtype) for x in (a, b))

    def run_xla():
        return xla(xa, xb).block_until_ready()

    def run_torch():
        return PRODUCTS[spec](ta, tb)

    run_xla(), run_torch()
    return run_xla, run_torch


def main(argv) -> None:
    del argv
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    rows, totals = [], {}
    for dtype in FLAGS.precisions:
        step_ms = {"xla": 0.0, "torch": 0.0}
        for name, t, k, n, count in dense_shapes(FLAGS.config):
            seconds = {"xla": 0.0, "torch": 0.0}
            for spec in PRODUCTS:
                run_xla, run_torch = _timers(spec, dtype, *_operands(spec, t, k, n, rng))
                rounds = {"xla": [], "torch": []}
                for _ in range(FLAGS.rounds):
                    rounds["xla"].append(_median_s(run_xla, FLAGS.repeats))
                    rounds["torch"].append(_median_s(run_torch, FLAGS.repeats))
                for lib in seconds:
                    seconds[lib] += statistics.median(rounds[lib])
            flops = 3 * 2 * t * k * n  # three products per layer
            rate = {lib: flops / s / 1e9 for lib, s in seconds.items()}
            rows.append((dtype, name, f"{t}×{k}×{n}", count, rate["xla"], rate["torch"]))
            print(f"{dtype} {name}: XLA {rate['xla']:.0f}, torch {rate['torch']:.0f} GFLOP/s")
            for lib in step_ms:
                step_ms[lib] += 1e3 * count * seconds[lib]
        totals[dtype] = {f"{lib}_ms_per_step": ms for lib, ms in step_ms.items()}
    print(f"\ntorch {torch.__version__}, jax {jax.__version__}")
    print("| precision | product | t × k × n | per step | XLA GFLOP/s | torch GFLOP/s | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for dtype, name, shape, count, xla, torch_rate in rows:
        rates = f"{xla:.0f} | {torch_rate:.0f} | {xla / torch_rate:.2f}×"
        print(f"| {dtype} | {name} | {shape} | {count} | {rates} |")
    for dtype, total in totals.items():
        print(
            f"{dtype}: the dense products of one step take {total['xla_ms_per_step']:.1f} ms "
            f"in XLA, {total['torch_ms_per_step']:.1f} ms in torch"
        )
    print(json.dumps({"rounds": FLAGS.rounds, "repeats": FLAGS.repeats, "totals": totals}))


if __name__ == "__main__":
    app.run(main)
