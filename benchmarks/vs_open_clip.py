r"""clipjax's CLIP train step against open_clip's, at a config's exact shapes, side by side.

Both steps run in this one process, on the same synthetic batch shapes, alternating: each
round times `--steps` steps of one library, then of the other, after a warm-up (compilation).
The result is the median step time of each over all rounds, and the ratio of the rates.

  open_clip: its `CLIP` model built from the `model_cfg` clipjax exports for the config, in
             training mode, `ClipLoss`, AdamW with the config's learning rate, weight decay,
             betas and eps, gradient-norm clipping and the logit-scale clamp of its trainer;
             precision fp32, or amp_bf16 (`torch.autocast` to bfloat16, as `--precision
             amp_bf16` in open_clip's trainer).
  clipjax:   `clipjax.train.build`'s jitted step of the same config, `model.dtype` float32 or
             bfloat16 (mixed precision: float32 parameters and accumulation).

Needs torch and open_clip next to clipjax's requirements, so CI never runs it:

  pip install -r requirements.txt torch open_clip_torch
  python benchmarks/vs_open_clip.py --config=configs/clip_vitb32.py:local
  python benchmarks/vs_open_clip.py --config=configs/clip_vitb32.py --config.batch_size=32

Prints one line per round and precision, then a markdown table, and last one JSON line.

With `--profile`, each precision's timed rounds are followed by one profiled step of each
library: clipjax's XLA thunks (`clipjax.tools.step_profile`) and open_clip's aten ops
(`torch.profiler`, self CPU time), both put in the same categories. The table gives each
category's share of the library's profiled time times its median step time, in ms per step:
with the products apart from everything else, the gap that is not XLA's matmul kernels shows.
"""

import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipjax import bench, weights  # noqa: E402
from clipjax.tools import step_profile  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (`path.py[:arg]`).", lock_config=True)
flags.DEFINE_integer("rounds", 5, "Alternating rounds (each library once per round).")
flags.DEFINE_integer("steps", 5, "Timed steps per library per round.")
flags.DEFINE_list("precisions", ["float32", "bfloat16"], "clipjax model.dtype values to compare.")
flags.DEFINE_bool("profile", False, "Also profile one step of each: time by op category.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# clipjax's model.dtype -> open_clip's --precision
OPEN_CLIP_PRECISION = {"float32": "fp32", "bfloat16": "amp_bf16"}
EOS_ID, PAD_ID = 2, 0


class OpenClipStep:
    """open_clip's training step, as its trainer takes it, on one fixed synthetic batch."""

    def __init__(self, config, precision: str):
        if config.objective != "clip":
            raise ValueError(f"Compares CLIP steps; the config's objective is {config.objective}.")
        model_cfg = weights.open_clip_config(config, EOS_ID, PAD_ID)["model_cfg"]
        self.model = open_clip.model.CLIP(**model_cfg, output_dict=True)
        self.model.train()
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim.lr,
            betas=(optim.b1, optim.b2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.loss = open_clip.ClipLoss()
        self.grad_clip = optim.grad_clip
        self.autocast = precision == "amp_bf16"
        rng = np.random.default_rng(0)
        n, size = config.batch_size, config.model.image.size
        length, vocab = config.model.text.context_length, config.model.text.vocab_size
        self.images = torch.from_numpy(rng.normal(size=(n, 3, size, size)).astype(np.float32))
        tokens = rng.integers(4, vocab, size=(n, length))
        tokens[:, -1] = EOS_ID
        self.texts = torch.from_numpy(tokens).long()

    def __call__(self):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(self.images, self.texts)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss.item()


class ClipjaxStep:
    """clipjax's compiled train step of `config` on one fixed synthetic batch."""

    def __init__(self, config):
        self.step, self.state, self.batch, _ = bench.compiled_step(config)

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch)
        return float(jax.device_get(metrics["train/loss"]))


# aten ops (self CPU time) -> step_profile's categories; the rest are elementwise.
TORCH_CATEGORIES = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_mkldnn"),
    "scatter": ("embedding_dense_backward", "index_add", "index_put", "scatter"),
    "reduction": ("sum", "mean", "norm", "native_layer_norm", "_softmax", "_log_softmax", "max"),
    "layout": ("copy_", "clone", "contiguous", "cat", "stack", "to", "_to_copy", "permute",
               "transpose", "t", "view", "reshape", "expand", "slice", "select", "empty",
               "zeros", "fill_", "zero_", "empty_strided", "as_strided", "unsqueeze"),
}  # fmt: skip


def _torch_category(name: str) -> str:
    op = name.removeprefix("aten::")
    for category, ops in TORCH_CATEGORIES.items():
        if op in ops or (category == "reduction" and op.endswith("_backward") and "norm" in op):
            return category
    return "elementwise"


def profile_open_clip(step) -> dict[str, float]:
    """Shares of one open_clip step's aten self CPU time, by category."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    seconds = dict.fromkeys(step_profile.CATEGORIES, 0.0)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            seconds[_torch_category(event.key)] += event.self_cpu_time_total * 1e-6
    total = sum(seconds.values())
    return {c: s / total for c, s in seconds.items()}


def profile_clipjax(step: "ClipjaxStep") -> dict[str, float]:
    """Shares of one clipjax step's XLA thunk time, by category."""
    with tempfile.TemporaryDirectory() as trace_dir:
        summary = step_profile.profile(step, 1, trace_dir, step.step.as_text())
    return {c: v["share"] for c, v in summary["by_category"].items()}


def _time(step, steps: int) -> float:
    """Median seconds of `steps` calls (each waits for its result)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(config, precision: str, rounds: int, steps: int, profile: bool = False) -> dict:
    config = config.copy_and_resolve_references()
    config.model.dtype = precision
    torch_precision = OPEN_CLIP_PRECISION[precision]
    steps_by_name = {
        "open_clip": OpenClipStep(config, torch_precision),
        "clipjax": ClipjaxStep(config),
    }
    for step in steps_by_name.values():
        step(), step()  # compile / warm up
    times = {name: [] for name in steps_by_name}
    for r in range(rounds):
        for name, step in steps_by_name.items():
            times[name].append(_time(step, steps))
        print(
            f"round {r + 1}/{rounds} {precision}: "
            + ", ".join(f"{n} {config.batch_size / t[-1]:.2f} samples/s" for n, t in times.items()),
            flush=True,
        )
    rates = {name: config.batch_size / statistics.median(t) for name, t in times.items()}
    result = {}
    if profile:
        shares = {
            "open_clip": profile_open_clip(steps_by_name["open_clip"]),
            "clipjax": profile_clipjax(steps_by_name["clipjax"]),
        }
        result["ms_per_step_by_category"] = {
            name: {c: 1e3 * share * config.batch_size / rates[name] for c, share in s.items()}
            for name, s in shares.items()
        }
    return result | {
        "clipjax_dtype": precision,
        "open_clip_precision": torch_precision,
        "batch_size": config.batch_size,
        "open_clip_samples_per_s": rates["open_clip"],
        "clipjax_samples_per_s": rates["clipjax"],
        "ratio": rates["clipjax"] / rates["open_clip"],
        "open_clip_round_samples_per_s": [config.batch_size / t for t in times["open_clip"]],
        "clipjax_round_samples_per_s": [config.batch_size / t for t in times["clipjax"]],
    }


def main(argv) -> None:
    del argv
    torch.set_num_threads(os.cpu_count())
    config = FLAGS.config
    results = [
        compare(config, p, FLAGS.rounds, FLAGS.steps, FLAGS.profile) for p in FLAGS.precisions
    ]
    print(f"\ntorch {torch.__version__}, open_clip {open_clip.__version__}, jax {jax.__version__}")
    print("| open_clip | samples/s | clipjax | samples/s | ratio |")
    print("| --- | ---: | --- | ---: | ---: |")
    for r in results:
        print(
            f"| {r['open_clip_precision']} | {r['open_clip_samples_per_s']:.2f} | "
            f"{r['clipjax_dtype']} | {r['clipjax_samples_per_s']:.2f} | {r['ratio']:.2f}× |"
        )
    for r in results:
        if "ms_per_step_by_category" in r:
            by = r["ms_per_step_by_category"]
            print(f"\n{r['open_clip_precision']} / {r['clipjax_dtype']}, ms per step:")
            print("| category | open_clip | clipjax |\n| --- | ---: | ---: |")
            for c in step_profile.CATEGORIES:
                print(f"| {c} | {by['open_clip'][c]:.1f} | {by['clipjax'][c]:.1f} |")
    print(json.dumps({"rounds": FLAGS.rounds, "steps": FLAGS.steps, "results": results}))


if __name__ == "__main__":
    app.run(main)
