#!/usr/bin/env bash
# The training input's rate by source, against what the :local train step consumes, and the
# converter's rate by worker count. The same 20,000 shapes pairs (64 px PNGs) as:
#   csv:            the exported files (python -m clipjax.tools.export_shapes)
#   webdataset:     40 tar shards of 500 pairs, streamed
#   arrayrecord:    those shards converted (python -m clipjax.tools.convert)
# Runs alternate; each prints one line. Usage: benchmarks/input_sources.sh [RUNS] [DIR]
# (PYTHONPATH=. where clipjax is not installed)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
dir=${2:-/tmp/clipjax_input_bench}
config=configs/clip_vitb32.py:local

if [ ! -f "$dir/files/train.csv" ]; then
  python -m clipjax.tools.export_shapes --output="$dir/files" --train=20000 --eval=16 --probe=16
fi
if [ ! -f "$dir/tars/shard-00039.tar" ]; then
  python - "$dir" <<'EOF'
import csv, io, os, sys, tarfile

folder = sys.argv[1]
os.makedirs(f"{folder}/tars", exist_ok=True)
with open(f"{folder}/files/train.csv") as f:
    rows = list(csv.DictReader(f))
for shard in range(40):
    with tarfile.open(f"{folder}/tars/shard-{shard:05d}.tar", "w") as tar:
        for i, row in enumerate(rows[shard * 500 : (shard + 1) * 500]):
            key = f"{shard:05d}{i:04d}"
            with open(f"{folder}/files/{row['image']}", "rb") as image:
                members = ((f"{key}.png", image.read()), (f"{key}.txt", row["caption"].encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
EOF
fi

echo "== the converter: 40 tars of 500 pairs -> ArrayRecord, by --workers (and --max_side=32,"
echo "   which decodes, shrinks and re-encodes every image)"
for run in $(seq "$runs"); do
  for max_side in 0 32; do
    for workers in 1 2; do
      out="$dir/ar_${workers}_$max_side"
      rm -rf "$out"
      start=$(date +%s.%N)
      python -m clipjax.tools.convert --input="$dir/tars/*.tar" --output="$out" \
        --workers=$workers --max_side=$max_side 2>/dev/null
      end=$(date +%s.%N)
      python -c "print(f'run $run  max_side $max_side  workers $workers  \
{20000 / ($end - $start):,.0f} records/s ({$end - $start:.1f} s, start-up included)')"
    done
  done
done

echo "== the :local train step and the pipeline by source (images/s; 1 worker, batch 128)"
for run in $(seq "$runs"); do
  step=$(python -m clipjax.bench --config=$config --steps=20 2>/dev/null \
    | grep -o '"samples_per_s": [0-9.]*' | head -1)
  echo "run $run  step consumes  $step"
  for spec in "shapes:20000" "csv:$dir/files/train.csv" "arrayrecord:$dir/ar_1_0" \
      "webdataset:$dir/tars/shard-{00000..00039}.tar"; do
    rate=$(python -m clipjax.bench --config=$config --data_only --steps=100 \
      --config.data.train="$spec" 2>/dev/null | grep -o '"images_per_s": [0-9.]*' | head -1)
    echo "run $run  $spec  $rate"
  done
done
