r"""`python -m clipjax.plan` for every config in configs/ on the targets of docs/benchmarks.md,
each at its own batch, as a Markdown table. Compiled, not run: no accelerator is used.

  pip install -r requirements-compile.txt
  python benchmarks/plan_configs.py --targets=v5e:16x16,v4:4x4x4,v5p:4x4x4,h100x8 \
      --output=/tmp/plans        # one JSON file per config and target, then the table

A (config, target) whose JSON is already in --output is not compiled again, so an interrupted
run resumes; `--table_only` prints the table of what is there. The largest batch per
data-parallel device is `≈` the estimate from the one compile (peak linear in the batch);
`--max_batch=N` finds it by compiling (more compiles each).
"""

import argparse
import glob
import json
import os
import subprocess
import sys

GIB = 1 << 30


def plan(config: str, target: str, output: str, max_batch: int, may_compile: bool) -> dict | None:
    """The JSON report of one compile, from --output or from a fresh `clipjax.plan` run (None
    when it is not there and `may_compile` is off, or when the compile failed)."""
    name = os.path.basename(config).removesuffix(".py")
    path = os.path.join(output, f"{name}@{target.replace(':', '_')}.json")
    if not os.path.exists(path):
        if not may_compile:
            return None
        command = [sys.executable, "-m", "clipjax.plan", f"--config={config}"]
        command += [f"--target={target}", f"--max_batch={max_batch}"]
        print(" ".join(command), file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr.strip().splitlines()[-1], file=sys.stderr)
            return None
        with open(path, "w") as f:
            f.write(done.stdout.strip().splitlines()[-1])
    with open(path) as f:
        return json.load(f)["targets"][0]


def row(config: str, r: dict) -> str:
    memory = r["memory_bytes"]
    searched = r.get("largest_batch", {}).get("fits")
    if searched:
        per_chip = f"{searched // r['data_parallel']:,}"
    else:  # the estimate from this one compile, marked as such
        per_chip = f"≈ {r['estimated_largest_batch'] // r['data_parallel']:,}"
    flops = f"{r['flops_per_example'] / 1e9:,.0f}" if r["flops_per_example"] else "—"
    fused = sum(c["forward"] for c in r["fused_attention_calls"].values())
    attention = f"cuDNN ({fused} fused)" if r["attention"] == "cudnn" else "XLA"
    collectives = ", ".join(f"{op} {c['count']}" for op, c in r["collectives"].items())
    return (
        f"| `{config}` | {r['target']} | {r['batch_size']:,} | {memory['arguments'] / GIB:.2f} "
        f"| {memory['temporaries'] / GIB:.2f} | {memory['peak'] / GIB:.2f} / "
        f"{r['device_memory_bytes'] / GIB:.0f} | {'yes' if r['fits'] else '**no**'} "
        f"| {per_chip} | {flops} | {collectives} | {attention} "
        f"| {r['rematerialisations']} | {r['compile_s']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="v5e:16x16,v4:4x4x4,v5p:4x4x4,h100x8")
    parser.add_argument("--configs", default="configs/*.py")
    parser.add_argument("--output", default="/tmp/plans")
    parser.add_argument("--max_batch", type=int, default=0)
    parser.add_argument(
        "--table_only", action="store_true", help="the table of the compiles in --output only"
    )
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    lines = [
        "| config | target | batch | arguments GiB | temporaries GiB | peak / chip GiB | fits "
        "| largest batch per chip | GFLOP per example | collectives (count) | attention "
        "| XLA remat | compile s |",
        "|---" * 13 + "|",
    ]
    for config in sorted(glob.glob(args.configs)):
        for target in args.targets.split(","):
            result = plan(config, target, args.output, args.max_batch, not args.table_only)
            if result:
                lines.append(row(os.path.basename(config), result))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
