#!/usr/bin/env bash
# The GPU check, as one command on an NVIDIA machine that has JAX with CUDA, flax, optax, orbax
# and torch, but not clipjax's other packages (see the README's "On a GPU"):
#
#   here (any machine with pip):  benchmarks/gpu/run.sh --fetch     # wheels into benchmarks/gpu/wheels
#   on the GPU machine:           benchmarks/gpu/run.sh             # output under ${OUT:-/tmp/gpu_out}
#   here, to check the commands:  benchmarks/gpu/run.sh --dry-run   # prints each step, runs none
#
# It installs the carried wheels (no index), then runs each step with its own time limit, its
# output in $OUT/logs/NAME.log; $OUT/summary.txt collects each step's command and last line.
#   1. benchmarks/gpu/attention.py: cuDNN's fused attention against XLA's, error and time;
#   2. clipjax.bench at ViT-B/32, batch 256, bfloat16 (MFU against the measured bf16 peak);
#   3. the loop against the bare step: :local float32 and bfloat16, ViT-B/32 at batch 32;
#   4. benchmarks/vs_open_clip.py at ViT-B/32, batch 256, bfloat16 against open_clip amp_bf16;
#   5. clipjax.bench at :local (bfloat16) and at ViT-B/32 batch 1024;
#   6. a 300-step :local training run, with its zero-shot evaluation.
# The test suite is not among them: it runs on CPU, on Python 3.12 and JAX 0.11 too (.ci/run).
# Budget: $BUDGET seconds of steps (default 420) after the install; a step that could pass it
# is skipped, so the outputs always come back.
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS=benchmarks/gpu/wheels
OUT=${OUT:-/tmp/gpu_out}
# Packages the lent machine lacks (its JAX, flax, optax, orbax and torch are kept).
CARRIED=(grain==0.2.18 ml-collections==1.1.0 tensorboardX==2.6.5 array-record==0.8.6
  tensorflow-datasets==4.9.10 ftfy==6.3.1 wcwidth open_clip_torch dm-tree simple-parsing
  docstring-parser toml portpicker)

BUDGET=${BUDGET:-420}  # seconds for all steps: one that might not end within it is skipped
run() {  # run NAME SECONDS CMD...: the command's output into $OUT/logs/NAME.log
  local name=$1 limit=$2; shift 2
  if ((SECONDS + limit > BUDGET)); then
    echo "== $name: skipped, ${limit}s would pass the ${BUDGET}s budget" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "== $name (${limit}s): $*" | tee -a "$OUT/summary.txt"
  if [[ ${DRY_RUN:-0} == 1 ]]; then return; fi
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  { tail -n 1 "$OUT/logs/$name.log"; echo "   (exit $rc, $((SECONDS - start)) s)"; } |
    tee -a "$OUT/summary.txt"
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

mkdir -p "$OUT/logs"
: >"$OUT/summary.txt"
if [[ ${DRY_RUN:-0} != 1 ]]; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site \
    --find-links "$WHEELS" "${CARRIED[@]}" || exit 1
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint as o, torch; print(sys.version.split()[0],
    'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax',
    o.__version__, 'torch', torch.__version__)" | tee -a "$OUT/summary.txt"
fi
LOCAL=(--config=configs/clip_vitb32.py:local)
B32=(--config=configs/clip_vitb32.py --config.model.dtype=bfloat16)
run attention 45 python3 benchmarks/gpu/attention.py --batch=256
run bench_b32_256 75 python3 -m clipjax.bench "${B32[@]}" --config.batch_size=256 --steps=20
run loop_local_fp32 50 python3 -m clipjax.bench "${LOCAL[@]}" --loop --steps=100
run loop_local_bf16 50 python3 -m clipjax.bench "${LOCAL[@]}" --config.model.dtype=bfloat16 \
  --loop --steps=100
run loop_b32_32 60 python3 -m clipjax.bench "${B32[@]}" --config.batch_size=32 --loop --steps=50
run vs_open_clip 90 python3 benchmarks/vs_open_clip.py "${B32[@]}" --config.batch_size=256 \
  --precisions=bfloat16 --rounds=5 --steps=10
run bench_local 35 python3 -m clipjax.bench "${LOCAL[@]}" --config.model.dtype=bfloat16
run bench_b32_1024 50 python3 -m clipjax.bench "${B32[@]}" --config.batch_size=1024 --steps=10
run train_local 90 python3 -m clipjax.main "${LOCAL[@]}" --config.total_steps=300 \
  --config.eval_every=300 --workdir=/tmp/train_local
if [[ ${DRY_RUN:-0} != 1 ]]; then
  cp /tmp/train_local/metrics.jsonl "$OUT/logs/train_local_metrics.jsonl" 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
fi
echo "outputs in $OUT"
