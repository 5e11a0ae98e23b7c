#!/usr/bin/env bash
# Issue 27's measurements, one `python -m clipjax.bench` per row, in one command on one machine:
# gradient accumulation (memory and step time at a fixed global batch), a locked image tower
# and patch dropout, at `:local` and at ViT-B/32. Each line of the output is
#   <label> <bench's JSON>
# Usage: benchmarks/large_batches.sh [OUTPUT_FILE]   (default /tmp/large_batches.jsonl)
set -euo pipefail
out=${1:-/tmp/large_batches.jsonl}
: > "$out"
bench() {  # bench LABEL FLAGS...
  local label=$1; shift
  local json
  json=$(python -m clipjax.bench "$@" 2>/dev/null | tail -1)
  echo "$label $json" | tee -a "$out"
}
local=(--config=configs/clip_vitb32.py:local)
b32=(--config=configs/clip_vitb32.py --config.batch_size=256)
# Accumulation at a fixed global batch: :local (128), ViT-B/32 (256) on one device.
for k in 1 2 4 8; do bench "local accum=$k" "${local[@]}" --steps=20 --config.accum_steps=$k; done
for k in 1 2 4 8; do bench "b32 accum=$k compile" "${b32[@]}" --compile_only --config.accum_steps=$k; done
# Timed at batch 64: batch 256 without accumulation needs 25 GB of scratch memory on CPU.
for k in 1 8; do
  bench "b32 batch64 accum=$k" --config=configs/clip_vitb32.py --config.batch_size=64 \
    --steps=3 --config.accum_steps=$k
done
# A locked image tower (LiT).
for locked in False True; do
  bench "local locked=$locked" "${local[@]}" --steps=20 --config.model.image.locked=$locked
done
for locked in False True; do
  bench "b32 batch32 locked=$locked" --config=configs/clip_vitb32.py --config.batch_size=32 \
    --steps=3 --config.model.image.locked=$locked
done
# Patch dropout (FLIP).
for p in 0.0 0.5 0.75; do
  bench "local patch_dropout=$p" "${local[@]}" --steps=20 --config.model.image.patch_dropout=$p
done
for p in 0.0 0.5 0.75; do
  bench "b32 batch32 patch_dropout=$p" --config=configs/clip_vitb32.py --config.batch_size=32 \
    --steps=3 --config.model.image.patch_dropout=$p
done
