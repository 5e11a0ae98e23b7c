#!/usr/bin/env bash
# The GPU check, as one command on an NVIDIA machine that has JAX with CUDA, flax, optax, orbax
# and torch, but not clipjax's other packages (see the README's "On a GPU"):
#
#   here (any machine with pip):  benchmarks/gpu/run.sh --fetch     # wheels into benchmarks/gpu/wheels
#   on the GPU machine:           benchmarks/gpu/run.sh             # output under ${OUT:-/tmp/gpu_out}
#   here, to check the commands:  benchmarks/gpu/run.sh --dry-run   # prints each step, runs none
#
# It installs the carried wheels (no index), then runs, each step's output in its own file:
#   1. the test suite without the multi-process tests;
#   2. clipjax.bench at :local and at ViT-B/32 with batch 256 and 1024, bfloat16 (MFU against
#      the measured bf16 matmul peak), and the loop against the bare step;
#   3. benchmarks/vs_open_clip.py at ViT-B/32, batch 256, bfloat16 against open_clip amp_bf16;
#   4. a 300-step :local training run, with its zero-shot evaluation.
# Budget: about 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=benchmarks/gpu/wheels
OUT=${OUT:-/tmp/gpu_out}
# Packages the lent machine lacks (its JAX, flax, optax, orbax and torch are kept).
CARRIED=(grain==0.2.18 ml-collections==1.1.0 tensorboardX==2.6.5 array-record==0.8.6
  tensorflow-datasets==4.9.10 ftfy==6.3.1 wcwidth open_clip_torch dm-tree simple-parsing
  docstring-parser toml)

run() {  # run NAME CMD...: the command's output into $OUT/NAME.log, and its last line shown
  echo "== $1: ${*:2}"
  if [[ ${DRY_RUN:-0} == 1 ]]; then return; fi
  local name=$1; shift
  timeout "${STEP_TIMEOUT:-240}" "$@" >"$OUT/$name.log" 2>&1 || echo "   (exit $?)"
  tail -n 1 "$OUT/$name.log"
}

case "${1:-}" in
  --fetch)
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform any -d "$WHEELS" "${CARRIED[@]}"
    du -sh "$WHEELS"
    exit 0
    ;;
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--fetch | --dry-run]" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
if [[ ${DRY_RUN:-0} != 1 ]]; then
  python -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "${CARRIED[@]}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
B32=(--config=configs/clip_vitb32.py --config.model.dtype=bfloat16)
run tests python -m pytest -q -x -p no:xdist -o addopts="" tests --ignore=tests/test_multiprocess.py \
  --deselect tests/test_launch.py
run bench_local python -m clipjax.bench --config=configs/clip_vitb32.py:local --config.model.dtype=bfloat16
run bench_b32_256 python -m clipjax.bench "${B32[@]}" --config.batch_size=256 --steps=20
run bench_b32_1024 python -m clipjax.bench "${B32[@]}" --config.batch_size=1024 --steps=10
run loop_local python -m clipjax.bench --config=configs/clip_vitb32.py:local --loop --steps=100
run loop_b32_256 python -m clipjax.bench "${B32[@]}" --config.batch_size=256 --loop --steps=50
run vs_open_clip python benchmarks/vs_open_clip.py "${B32[@]}" --config.batch_size=256 \
  --precisions=bfloat16 --rounds=5 --steps=10
run train_local python -m clipjax.main --config=configs/clip_vitb32.py:local \
  --config.total_steps=300 --config.eval_every=300 --workdir="$OUT/train_local"
echo "outputs in $OUT"
