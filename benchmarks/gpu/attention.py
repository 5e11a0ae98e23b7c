r"""On a GPU: `layers.attend` through cuDNN's fused kernel against XLA's (`lean_attention`), at
the shapes of ViT-B/32 (50 tokens, full attention), its text tower (77 tokens, causal), ViT-B/16
(197) and ViT-L/14 (257). cuDNN refuses the odd lengths in training: `attend` pads them to a
multiple of 8 and masks the padding (`layers.padded_attention`).

For each shape, in bfloat16: the largest difference of the output and of the three input
gradients between the two implementations, each against a float32 reference (the explicit
softmax formula on float32 copies of the same operands), whether the jitted `auto` path holds
a cuDNN fused-attention custom call, and the median time of forward + backward for each
implementation. Prints one JSON line per shape.

  python benchmarks/gpu/attention.py --batch=256
"""

import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from clipjax.models import layers  # noqa: E402

flags.DEFINE_integer("batch", 256, "Batch of sequences.")
flags.DEFINE_integer("repeats", 7, "Timed repeats; the median is reported.")
flags.DEFINE_integer("iters", 20, "Forward + backward calls per repeat.")
flags.DEFINE_list("impls", ["xla", "cudnn", "auto"], "model.attention values to compare.")
FLAGS = flags.FLAGS

# name -> (length, heads, head_dim, causal)
SHAPES = {
    "vit_b32": (50, 12, 64, False),
    "text_b32": (77, 8, 64, True),
    "vit_b16": (197, 12, 64, False),
    "vit_l14": (257, 16, 64, False),
}


def reference(q, k, v, causal):
    """The explicit formula in float32: softmax(q k^T / sqrt(d)) v, positions first."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    if causal:
        length = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)


def fwd_bwd(attend, cotangent):
    """(q, k, v) -> (output, (dq, dk, dv)) for the cotangent, jitted."""

    def run(q, k, v):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(cotangent.astype(out.dtype))

    return jax.jit(run)


def median_ms(fn, args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(FLAGS.iters):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / FLAGS.iters * 1e3)
    return statistics.median(times)


def max_diff(got, want):
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))


def main(argv):
    del argv
    print(json.dumps({"backend": jax.default_backend(), "device": str(jax.devices()[0])}))
    for name, (length, heads, head_dim, causal) in SHAPES.items():
        keys = jax.random.split(jax.random.key(0), 4)
        shape = (FLAGS.batch, length, heads, head_dim)
        q32, k32, v32, g32 = (jax.random.normal(key, shape, jnp.float32) for key in keys)
        want_out, want_grads = fwd_bwd(functools.partial(reference, causal=causal), g32)(
            q32, k32, v32
        )
        row = {"shape": name, "batch": FLAGS.batch, "length": length, "causal": causal}
        bf16 = tuple(x.astype(jnp.bfloat16) for x in (q32, k32, v32))
        for impl in FLAGS.impls:
            attend = functools.partial(layers.attend, causal=causal, implementation=impl)
            fn = fwd_bwd(attend, g32)
            out, grads = fn(*bf16)
            row[f"{impl}_out_err"] = max_diff(out, want_out)
            row[f"{impl}_grad_err"] = max(map(max_diff, grads, want_grads))
            row[f"{impl}_ms"] = median_ms(fn, bf16)
            if impl == "auto":
                hlo = fn.lower(*bf16).compile().as_text()
                row["auto_uses_cudnn"] = "__cudnn$fmha" in hlo
        if "cudnn_ms" in row:
            row["cudnn_speedup"] = row["xla_ms"] / row["cudnn_ms"]
        row["scale"] = float(jnp.max(jnp.abs(want_out)))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
