r"""Will a config fit on these chips, and at which batch? Compiled, not run.

  python -m clipjax.plan --config=configs/clip_vitb32.py --target=v5e:16x16,h100x8
  python -m clipjax.plan --config=configs/siglip_vitb16.py --target=v5e:16x16 --max_batch=65536

For each target (a TPU topology such as `v5e:16x16`, `v4:4x4x4`, `v5p:4x4x4`, `v6e:16x16`, or
NVIDIA GPUs such as `h100x8`, `h200x8`, `a100x8`) the config's real train step is lowered and
compiled for the target's abstract devices on this CPU: nothing is allocated and no
accelerator is needed. It prints per-device memory (arguments, outputs, aliased, temporaries,
peak against the chip's memory), whether it fits, flops per example, each collective's count
and bytes, the attention kernel each tower got, XLA's rematerialisations and the compile
time. With `--max_batch=N` it also finds the largest global batch up to N that fits, over
multiples of the data-parallel size, each next compile where the peak memory interpolated
between earlier ones reaches the chip's (at most `--max_compiles` compiles). The last line
is one JSON object: {"targets": [one report per target]}.

Needs JAX's accelerator plugins, without a device: `pip install -r requirements-compile.txt`.
"""

import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from clipjax import plan
from clipjax.errors import ConfigError
from clipjax.plan import targets

FLAGS = flags.FLAGS
GIB = 1 << 30


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Config file (`path.py[:arg]`).", lock_config=True
    )
    flags.DEFINE_list("target", None, "Targets: v5e:16x16, v4:4x4x4, h100x8, ... (comma list).")
    flags.DEFINE_integer("max_batch", 0, "Find the largest global batch up to this; 0: skip.")
    flags.DEFINE_integer("max_compiles", 6, "At most this many compiles in the batch search.")
    flags.mark_flags_as_required(["config", "target"])


def _progress(line: str) -> None:
    """A compile can take minutes: say which one runs (stderr, so stdout stays the report)."""
    print(f"clipjax.plan: {line} ...", file=sys.stderr, flush=True)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _table(config_name: str, result: dict) -> str:
    """The report of one target, as the lines printed."""
    memory, size = result["memory_bytes"], result["device_memory_bytes"]
    lines = [
        f"{config_name} on {result['target']}: {result['devices']} × {result['chip']} "
        f"({_gib(size)} each), global batch {result['batch_size']:,} "
        f"({result['data_parallel']} data-parallel), {result['params']:,} parameters; "
        f"compiled, not run, in {result['compile_s']:.0f} s",
    ]
    for term in ("arguments", "outputs", "aliased", "temporaries"):
        lines.append(f"  {term:<24}{_gib(memory[term]):>12}")
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    lines.append(
        f"  {'peak per device':<24}{_gib(memory['peak']):>12}  of {_gib(size)} "
        f"({memory['peak'] / size:.0%}): {verdict}"
    )
    if not result["fits"]:
        lines.append(f"  the {result['dominant']} dominate; to fit, {result['remedy']}")
    if "largest_batch" in result:
        search = result["largest_batch"]
        found = f"{search['fits']:,}" if search["fits"] else "none"
        beyond = f"; {search['fails']:,} does not" if search["fails"] else ""
        lines.append(f"  {'largest batch that fits':<24}{found:>12}{beyond}")
    else:
        estimate = f"{result['estimated_largest_batch']:,}"
        lines.append(
            f"  {'largest batch, estimated':<24}{estimate:>12}  (peak linear in the batch; "
            "--max_batch compiles to find it)"
        )
    if result["flops_per_example"]:
        lines.append(f"  {'flops per example':<24}{result['flops_per_example']:>12.3e}")
    for op, entry in result["collectives"].items():
        lines.append(f"  {op:<24}{entry['count']:>12} × ({entry['bytes'] / 2**20:,.1f} MiB)")
    calls = result["fused_attention_calls"]
    fused = ", ".join(
        f"{tower} {c['forward']} fwd + {c['backward']} bwd" for tower, c in calls.items()
    )
    kernel = "cuDNN fused" if result["attention"] == "cudnn" else "XLA"
    lines.append(f"  {'attention':<24}{kernel:>12}  (cuDNN calls: {fused})")
    lines.append(f"  {'XLA rematerialisations':<24}{result['rematerialisations']:>12}")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    config, config_name = FLAGS.config, config_flags.get_config_filename(FLAGS["config"])
    reports = []
    try:
        chosen = [targets.resolve(name) for name in FLAGS.target]
        for target in chosen:
            _progress(f"compiling for {target.name} at batch {config.batch_size:,}")
            compiled = plan.compile_step(config, target)
            result = plan.report(compiled, target)
            if FLAGS.max_batch:
                known = {config.batch_size: result["memory_bytes"]}
                fits, fails, spent = plan.largest_batch(
                    config, target, FLAGS.max_batch, FLAGS.max_compiles, known, _progress
                )
                result["largest_batch"] = {"fits": fits, "fails": fails, "compiles": spent}
            print(_table(config_name, result), flush=True)
            reports.append(result)
    except ConfigError as e:
        sys.exit(f"clipjax.plan: {e}")
    print(json.dumps({"config": config_name, "targets": reports}))


if __name__ == "__main__":
    # No accelerator is used: JAX stays on the CPU, whatever plugins are installed.
    jax.config.update("jax_platforms", "cpu")
    define_flags()
    app.run(main)
